"""The command line is generated from the config models: every option of every command is one
model field (its default included), one spelling per flag, and the CLI starts without the heavy
libraries."""

from __future__ import annotations

import re
import subprocess
import sys
import typing

import pytest
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.cli.app import COMMANDS
from rangelens.cli.options import SWITCHES, default_text, fields_of

HEAVY = ("torch", "transformers", "openai")


@pytest.mark.parametrize(
    "modules",
    [
        ["rangelens.cli"],
        ["rangelens.cli", "rangelens.report.atlas", "rangelens.report.server"],
        ["rangelens.config", "rangelens.rundir", "rangelens.erasure.outputs"],
    ],
)
def test_cli_and_report_import_no_heavy_library(modules: list[str]) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_help_and_argument_errors_load_no_heavy_library() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom rangelens.cli import app\n"
        "r = CliRunner()\n"
        "for args in (['--help'], ['analyze', '--help'], ['explain', '--help'],"
        " ['analyze', '--tau', '-1'], ['run', 'missing.yaml']):\n"
        "    r.invoke(app, args)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _options(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help text, from click's plain help (continuation lines joined)."""
    found: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)(?: / --no-[\w-]+)?(?: [A-Z]+)?\s*(.*)$", line)
        if m:
            current = m.group(1)
            found[current] = m.group(2)
        elif current and line.startswith("      "):
            found[current] += " " + line.strip()
    return found


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_one_config_field_with_its_default(name: str) -> None:
    _body, spec = COMMANDS[name]
    res = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    shown = _options(res.output)
    fields = fields_of(spec["models"])
    switches = {SWITCHES[s][0].split("/")[0] for s in spec.get("switches", [])}
    expected = {"--" + f.replace("_", "-") for f in fields} | switches | {"--help"}
    assert set(shown) == expected, set(shown) ^ expected
    origins = spec.get("origins", {})
    for field, (_model, info) in fields.items():
        text = " ".join(shown["--" + field.replace("_", "-")].split())
        default = default_text(info.get_default(call_default_factory=True))
        origin = origins.get(field)
        wanted = f"[default: {origin}, else {default}]" if origin else f"[default: {default}]"
        assert wanted in text.replace("- ", "-"), (field, text)
        assert (info.description or "")[:20] in text.replace("- ", "-"), (field, text)


def test_one_spelling_per_flag() -> None:
    outputs = [n for n, (_b, spec) in COMMANDS.items() if "out" in fields_of(spec["models"])]
    assert set(outputs) >= {"analyze", "run", "demo", "explain", "report"}
    for name in outputs:
        res = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
        assert "-o, --out PATH" in res.output, name
        assert "--output" not in res.output
    for name in COMMANDS:  # one placeholder vocabulary
        res = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
        assert not re.search(r"<(str|int|float|bool)>", res.output.split("Options:")[1]), name


def test_literal_options_list_their_choices() -> None:
    from rangelens.config import AnalysisConfig

    valid = typing.get_args(AnalysisConfig.model_fields["ranking"].annotation)
    res = CliRunner().invoke(app, ["analyze", "--ranking", "magic"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: unknown ranking 'magic'; valid: " + ", ".join(
        repr(v) for v in valid
    )


def test_tables_never_cut_names_when_output_is_not_a_terminal(capsys) -> None:
    """A long concept name reaches a piped or captured output whole (rich would cut it at 80
    columns)."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from rangelens.cli import show

    name = "entertainment-and-culture-with-a-very-long-label"
    summary = pd.DataFrame(
        [
            {
                "concept": c,
                "n_neurons": 3,
                "median_skew": 0.0,
                "median_excess_kurtosis": 0.0,
                "median_bhattacharyya_max": 0.5,
                "median_purity": 0.5,
            }
            for c in (name, "overall")
        ]
    )
    result = SimpleNamespace(
        capture=SimpleNamespace(
            info={
                "site": "resid.1",
                "module": "m",
                "n_texts": 2,
                "n_tokens": 4,
                "tokens_per_second": 1.0,
                "peak_rss_mb": 1.0,
            },
            label_names=[name],
            stats=SimpleNamespace(count=np.array([2])),
        ),
        range_map=SimpleNamespace(metadata={"position": "last", "ranking": "dprime"}),
        polysemanticity=pd.DataFrame({"concept": [name], "shared": [0.5]}),
        summary=summary,
        run_dir="runs/x",
    )
    show.print_analysis(result)
    assert name in capsys.readouterr().out
