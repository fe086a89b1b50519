"""One stage runner: a :class:`Stage` declares its inputs, upstream stages, how to compute, save
and load its result; the :class:`Runner` decides per stage whether to reuse it or run it.

A stage is reused when its directory records the fingerprint of its inputs and of its upstream
stages' fingerprints, and its files load; otherwise it runs, and its result is written atomically
(a temporary sibling renamed into place) with ``stage.json``. Every decision is reported: "reused",
or "ran" with the reason (no earlier output, inputs changed, earlier output unreadable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rangelens.artifacts import EXPLANATIONS, STAGE, Kind, atomic_dir, notice
from rangelens.provenance import fingerprint
from rangelens.rundir import RunDir, mark_stage, stage_fingerprint

T = TypeVar("T")


@dataclass
class Stage(Generic[T]):
    """One step of the pipeline.

    ``inputs`` (JSON-able) and the fingerprints of ``upstream`` stages form the fingerprint;
    ``compute`` produces the result, ``save`` writes it into a directory, ``load`` reads it back
    (the same loader the report uses). ``info`` adds fields to ``stage.json`` (e.g. timings)."""

    name: str
    inputs: Any
    compute: Callable[[], T]
    save: Callable[[T, Any], None]
    load: Callable[[Any], T]
    upstream: tuple[str, ...] = ()
    info: Callable[[T], dict[str, Any]] = field(default=lambda _result: {})
    check: Callable[[], None] = field(default=lambda: None)  # bad input fails before it starts

    @property
    def kind(self) -> Kind:
        return EXPLANATIONS if self.name == "explanations" else STAGE


@dataclass(frozen=True)
class StageEvent:
    """What the runner did with one stage."""

    stage: str
    action: str  # "reused" or "ran" ("running" while it runs, reported only)
    why: str = ""

    def __str__(self) -> str:
        return f"{self.stage}: {self.action}" + (f" ({self.why})" if self.why else "")


class Runner:
    """Runs stages of one run directory in order, reusing current ones.

    ``write``: False on torchrun workers other than rank 0 (they compute, never write).
    ``before_write`` is called once, before the first stage is written (e.g. ``run.json``).
    ``report`` receives each :class:`StageEvent` as it happens."""

    def __init__(
        self,
        run_dir: RunDir,
        *,
        write: bool = True,
        before_write: Callable[[], None] | None = None,
        report: Callable[[StageEvent], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.write = write
        self.before_write = before_write
        self.report = report
        self.fingerprints: dict[str, str] = {}
        self.events: list[StageEvent] = []

    def fingerprint(self, stage: Stage[Any]) -> str:
        missing = [u for u in stage.upstream if u not in self.fingerprints]
        if missing:
            raise RuntimeError(f"stage {stage.name!r} runs before its upstream {missing}")
        upstream = [self.fingerprints[u] for u in stage.upstream]
        return fingerprint(stage.name, stage.inputs, upstream)

    def __call__(self, stage: Stage[T]) -> T:
        fp = self.fingerprint(stage)
        directory = self.run_dir.stage(stage.name)
        recorded = stage_fingerprint(directory)
        why = "no earlier output" if recorded is None else "inputs changed"
        if recorded == fp:
            try:
                result = stage.load(directory)
            except Exception as err:  # noqa: BLE001 (any failure to read a stage means redoing it)
                reason = (str(err).splitlines() or [type(err).__name__])[0]
                why = f"earlier output unreadable: {reason}"
                notice(
                    f"stage {str(directory)!r} is marked done but cannot be read ({reason}); redoing it"
                )
            else:
                return self._done(stage, fp, result, StageEvent(stage.name, "reused"))
        stage.check()
        if self.report is not None:  # long work ahead: say so before it starts
            self.report(StageEvent(stage.name, "running", why))
        result = stage.compute()
        if self.write:
            if self.before_write is not None:
                self.before_write()
                self.before_write = None
            with atomic_dir(directory, stage.kind) as tmp:
                stage.save(result, tmp)
                mark_stage(tmp, stage.name, fp, **stage.info(result))
        return self._done(stage, fp, result, StageEvent(stage.name, "ran", why))

    def _done(self, stage: Stage[T], fp: str, result: T, event: StageEvent) -> T:
        self.fingerprints[stage.name] = fp
        self.events.append(event)
        if self.report is not None:
            self.report(event)
        return result
