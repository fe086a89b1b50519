"""The comparison protocol: disjoint pools, calibration on the calibration pool only, equal budget,
the lookup-table baseline, failures, and the text-only lexical simulator and judge."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_explain_core import synthetic

from rangelens.errors import RangelensError
from rangelens.explain import ActivationRecord, explain_record
from rangelens.explain.evaluation import Evaluator, LookupTable, fuzz_set
from rangelens.explain.lexical import LexicalSimulator, segment
from rangelens.explain.lexical_judge import LexicalJudge
from rangelens.explain.naming import MIXED, mode_label
from rangelens.explain.offline import OfflineRefiner, offline_roles, render
from rangelens.explain.records import POOLS
from rangelens.explain.roles import Component, FailureLog, Mode
from rangelens.explain.scoring import fit_calibration


def test_pools_are_disjoint_and_checked():
    rec = synthetic()
    seen = [{r.text_index for r in getattr(rec, name)} for name in POOLS]
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert seen[i].isdisjoint(seen[j]), (POOLS[i], POOLS[j])
    assert all(seen)
    with pytest.raises(RangelensError, match="both the validation and the held_out pool"):
        replace(rec, held_out=rec.held_out + rec.validation[:1])


class RecordingRefiner(OfflineRefiner):
    """The offline refiner, remembering which texts it was shown."""

    shown: list[int]

    def propose(self, modes, worst, record, trace):
        self.shown += [r.text_index for r in worst]
        return super().propose(modes, worst, record, trace)


def test_loop_feedback_acceptance_and_budget():
    rec = synthetic()
    roles = offline_roles()
    refiner = RecordingRefiner(roles.refiner.embedder)  # type: ignore[attr-defined]
    refiner.shown = []
    roles.refiner = refiner
    result = explain_record(rec, roles, rounds=2)
    feedback = {r.text_index for r in rec.feedback}
    assert refiner.shown and set(refiner.shown) <= feedback  # never validation or held-out texts
    assert result.n_candidates == len(result.history)  # every scored candidate is in the history
    assert result.single_pass.validation >= result.single_pass_first.validation  # best of N
    assert result.lookup is not None and result.control is not None
    assert result.iterative.judge_auc is not None and result.iterative.fuzz_auc is not None


def test_calibration_uses_only_the_calibration_pool():
    rec = synthetic()
    ev = Evaluator(offline_roles(), rec, FailureLog())
    predict = lambda recs: ev.raw("sports: goal, match, team", recs)  # noqa: E731
    cal, _ = ev.calibrate(predict)
    scrambled = [replace(r, activations=[a * -3 + 1 for a in r.activations]) for r in rec.held_out]
    cal_same, _ = Evaluator(
        offline_roles(), replace(rec, held_out=scrambled), FailureLog()
    ).calibrate(predict)
    assert cal == cal_same
    doubled = [replace(r, activations=[2 * a for a in r.activations]) for r in rec.validation]
    cal_other, _ = Evaluator(
        offline_roles(), replace(rec, validation=doubled), FailureLog()
    ).calibrate(predict)
    assert cal_other != cal


def test_calibration_linear_and_percentile():
    recs = [ActivationRecord(["a"] * 4, [0] * 4, [1.0, 3.0, 5.0, 7.0], 0)]
    lin = fit_calibration([np.array([0.0, 1.0, 2.0, 3.0])], recs, "linear")
    assert lin.slope == pytest.approx(2.0) and lin.intercept == pytest.approx(1.0)
    inverted = fit_calibration([np.array([3.0, 2.0, 1.0, 0.0])], recs, "linear")
    assert inverted.slope == 0.0  # never rewarded for predicting the opposite
    pct = fit_calibration([np.array([0.0, 10.0, 20.0, 30.0])], recs, "percentile")
    assert np.allclose(pct(np.array([0.0, 30.0])), [1.0, 7.0])
    assert np.all(np.diff(pct(np.linspace(-5, 40, 20))) >= 0)
    failed = fit_calibration([None], recs, "linear")
    assert failed.slope == 0.0 and failed.intercept == pytest.approx(4.0)


def test_lookup_table_on_a_known_case():
    recs = [
        ActivationRecord(["x", "y", "x"], [1, 2, 1], [2.0, 0.0, 4.0], 0),
        ActivationRecord(["y"], [2], [1.0], 1),
    ]
    table = LookupTable.fit(recs)
    assert table.means == {1: 3.0, 2: 0.5} and table.default == pytest.approx(7.0 / 4)
    (pred,) = table.predict([ActivationRecord(["x", "z"], [1, 9], [0.0, 0.0], 2)])
    assert pred is not None and np.allclose(pred, [3.0, 7.0 / 4])


def test_empty_explanation_is_a_failure():
    rec = synthetic()
    ev = Evaluator(offline_roles(), rec, FailureLog())
    assert ev.validation([]) is None and ev.validation([Mode("x", "", [])]) is None
    scores = ev.final([])
    assert scores.empty and scores.held_out == 0.0 and scores.failed_texts == len(rec.held_out)


def test_subwords_merge_into_readable_words():
    wp = segment(["[CLS]", "una", "##ff", "##ord", "##able", "head", ",", "2005", "[SEP]"])
    assert wp.shown == ["[CLS]", "unaffordable", "head", ",", "2005", "[SEP]"] and wp.wordpiece
    bpe = segment(["The", " big", "gest", " un", "aff", "ordable", ",", " ", "2", "0", "\n", "New"])
    assert bpe.shown == ["The", "biggest", "unaffordable", ",", "20", "\n", "New"]
    sp = segment(["▁New", "▁York", "er", "s", "▁won"])
    assert sp.shown == ["New", "Yorkers", "won"]
    comps = [Component(w, "token", [w], 1.0 - i / 10) for i, w in enumerate(["most", "biggest"])]
    comps.append(Component("highest", "token", ["est"], 0.5))
    assert render(Mode("", "", comps)).explanation == "superlatives: most, biggest, highest"
    assert mode_label(["2005", "19", "three"], [], [])[0] == "numbers"
    assert mode_label(["running", "making", "taking"], [], [])[0] == "words ending in -ing"
    assert mode_label(["Open", " open"], ["Australian"], []) == ('the word "Open"', True)
    # nothing shared is said, with what was tried
    assert mode_label(["one", "More", ", the", "."], [], [])[0] == MIXED
    assert mode_label([], ["Niro"], [])[0] == 'words after "Niro"'


def test_lexical_simulator_reads_free_text_and_lists():
    sim = LexicalSimulator()
    tokens = ["The", " big", "gest", " goal", " in", " Paris", ",", " most", " said", " 2", "0"]
    rendered, written = (
        sim.simulate('superlatives: most, biggest, after "in"', [tokens, tokens], FailureLog())[0],
        sim.simulate(
            "Fires on superlative words such as 'most' and on numbers.", [tokens], FailureLog()
        )[0],
    )
    assert rendered is not None and written is not None
    lit = {tokens[t] for t in np.flatnonzero(rendered)}
    assert lit == {" big", "gest", " most", " Paris"}
    lit = {tokens[t] for t in np.flatnonzero(written)}
    assert {" most", " 2", "0"} <= lit and " goal" not in lit


def test_lexical_judge_detection_and_fuzzing():
    rec = synthetic()
    judge = LexicalJudge()
    texts, marks, labels = fuzz_set(rec.held_out, rec.threshold)
    assert labels.any() and not labels.all() and len(texts) == len(marks)
    scores = judge.judge(
        "sports: goal, match, team", [r.tokens for r in texts], marks, FailureLog()
    )
    correct = np.array([s for s, ok in zip(scores, labels, strict=True) if ok], dtype=float)
    wrong = np.array([s for s, ok in zip(scores, labels, strict=True) if not ok], dtype=float)
    assert correct.mean() > wrong.mean()
    det = judge.judge("sports: goal", [["a", " goal"], ["a", " film"]], None, FailureLog())
    assert det == [1.0, 0.0]
