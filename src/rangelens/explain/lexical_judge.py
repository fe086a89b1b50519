"""The lexical baseline judge (delphi-style detection and fuzzing without an LLM). It is the lexical
simulator's parser again, so it is no second opinion on the lexical explanations; the embedding
judge (:mod:`rangelens.explain.semantic`) is."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rangelens.explain.lexical import LexicalSimulator, predict
from rangelens.explain.roles import FailureLog


class LexicalJudge:
    """The lexical baseline :class:`~rangelens.explain.roles.Judge` (delphi-style detection and
    fuzzing without an LLM): detection scores a text by the strongest item of the explanation found
    in it; fuzzing by the share of highlighted tokens the explanation's items cover. It is the
    lexical simulator's parser again, so it is not a second opinion on the lexical explanations."""

    name = "lexical (the lexical simulator's parser)"

    def __init__(self) -> None:
        self.simulator = LexicalSimulator()

    def judge(
        self,
        explanation: str,
        texts: Sequence[Sequence[str]],
        highlights: Sequence[Sequence[bool]] | None,
        trace: FailureLog,
    ) -> list[float | None]:
        items = self.simulator.items(explanation)
        out: list[float | None] = []
        for i, tokens in enumerate(texts):
            pred = predict(items, tokens)
            if highlights is None:
                out.append(float(np.clip(pred.max(initial=0.0), 0.0, 1.0)))
            else:
                marked = np.asarray(highlights[i], dtype=bool)
                out.append(float((pred[marked] > 0).mean()) if marked.any() else None)
        return out
