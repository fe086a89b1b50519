"""A whole run from one YAML file: where it goes, the analysis, the erasure experiment and the
explanations (``null`` skips a section); and the packaged example configs."""

from __future__ import annotations

import importlib.resources
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from rangelens.config.analysis import AnalysisConfig
from rangelens.config.erasure import ErasureConfig
from rangelens.config.explain import ExplainConfig
from rangelens.config.report import Output
from rangelens.errors import RangelensError, choices


class RunConfig(Output):
    """A whole run: the analysis, the erasure experiment (``null`` skips it) and the explanations
    of the top salient neurons (absent or ``null``: none)."""

    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)  # type: ignore[arg-type]
    erasure: ErasureConfig | None = Field(default_factory=ErasureConfig)  # type: ignore[arg-type]
    explain: ExplainConfig | None = Field(
        None, description="explain the top salient neurons (offline lexical baseline by default)"
    )

    @property
    def run_dir(self) -> Path:
        """``out``, else ``runs/<model>-<dataset>`` (names of built-ins, file stems of paths)."""
        if self.out is not None:
            return self.out
        parts = [Path(self.analysis.model).stem, Path(self.analysis.dataset).stem]
        return Path("runs") / "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in parts)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run config (unknown keys and wrong types are errors)."""
    path = Path(path)
    if path.is_dir():
        raise RangelensError(
            f"{str(path)!r} is a directory, not a YAML run config (examples: rangelens/configs/; "
            f"to view a run directory: `rangelens report {path}`)"
        )
    if not path.is_file():
        raise RangelensError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RangelensError(
            f"config file {str(path)!r} is not valid YAML{where}: {err.problem or err.context}"
        ) from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RangelensError(
            f"config file {str(path)!r} is not valid YAML: {err}".splitlines()[0]
        ) from err
    if raw is None:
        raise RangelensError(
            f"config file {str(path)!r} is empty; give at least `out:` and `analysis:` "
            f"(examples: rangelens/configs/)"
        )
    if not isinstance(raw, dict):
        raise RangelensError(f"config file {str(path)!r} must hold a mapping of settings")
    return validate_run(raw, str(path))


def validate_run(raw: dict[str, typing.Any], where: str = "the run config") -> RunConfig:
    """A :class:`RunConfig` from a mapping; an unknown key is named with the valid ones."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        unknown = [e for e in err.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        loc = unknown[0]["loc"]
        key = ".".join(str(p) for p in loc)
        raise RangelensError(
            f"unknown key {key!r} in {where!r}; valid: {choices(_valid_keys(loc[:-1]))}"
        ) from err


def _valid_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) config model at ``loc`` of :class:`RunConfig`."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        model = next(
            a
            for a in (*typing.get_args(annotation), annotation)
            if isinstance(a, type) and issubclass(a, BaseModel)
        )
    return list(model.model_fields)


def example_config(model: str) -> Path:
    """The packaged example config for a built-in model (``smollm2-135m`` or ``minilm-l6``)."""
    resource = importlib.resources.files("rangelens") / "configs" / f"{model}.yaml"
    return Path(str(resource))
