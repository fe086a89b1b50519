"""The public API: `rangelens.__all__` is what docs/API.md lists, every member resolves lazily and
has a docstring, and the README's Python snippets run (with small sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import rangelens

ROOT = Path(__file__).resolve().parents[1]


def test_all_matches_docs_api() -> None:
    listed = re.findall(r"^### `([\w]+)`", (ROOT / "docs" / "API.md").read_text(), re.M)
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(rangelens.__all__)


def test_members_resolve_with_docstrings_and_import_stays_light() -> None:
    for name in rangelens.__all__:
        member = getattr(rangelens, name)
        if name != "__version__":
            assert (member.__doc__ or "").strip(), name
    with pytest.raises(AttributeError):
        rangelens.not_a_member  # noqa: B018
    code = "import rangelens, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


# README snippets run as written except for these size reductions (each must still apply, so the
# README cannot drift from what is tested).
SMALLER = {
    'dataset="bbc-news")': 'dataset="bbc-news", max_per_class=12, max_length=24)',
    "max_new_tokens=12": "max_new_tokens=3",
}


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_snippets_are_found() -> None:
    code = "\n".join(readme_snippets())
    for old in SMALLER:
        assert old in code, old
    assert "rl.tokenize" in code and "rl.model_inputs" in code


@pytest.mark.integration
def test_readme_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for i, snippet in enumerate(readme_snippets()):
        for old, new in SMALLER.items():
            snippet = snippet.replace(old, new)
        exec(compile(snippet, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "bbc" / "ranges" / "ranges.json").is_file()
    assert (tmp_path / "shared" / "bbc" / "export.json").is_file()
    masked, base = namespace["masked"], namespace["base"]
    assert masked.shape == base.shape  # type: ignore[attr-defined]
