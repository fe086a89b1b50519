"""LLM scoring (echo / log-probability simulation, detection, fuzzing), explainer guards and robust
LLM I/O against a real scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import test_explain_clients as scripted
from test_explain_core import synthetic
from typer.testing import CliRunner

from rangelens.cli import app
from rangelens.explain.clients import LLM, Completion, LLMUnavailable, ReplyError, ResponseCache
from rangelens.explain.evaluation import fuzz_set, judged
from rangelens.explain.llm import LLMExplainer
from rangelens.explain.llm_scoring import (
    LLMJudge,
    LLMSimulator,
    parse_echo,
    parse_word_list,
    shown_token,
)
from rangelens.explain.prompts import check_explanation, parse_json
from rangelens.explain.roles import FailureLog

Reply, sequence = scripted.Reply, scripted.sequence
serve = scripted.serve  # the scripted-server fixture

TOKENS = [" The", " striker", " scored", " a", " goal", "\n", " today"]


def block(prompt: str, label: str) -> str:
    return re.search(rf"<<<TEXT {label}\n(.*?)\nTEXT>>>", prompt, re.S)[1]  # type: ignore[index]


def echo_server(prompt: str, *, logprobs: bool = False) -> str | Reply:
    """Echo every token with 8 if the explanation quotes it, else 0 (with log-probabilities: the
    value token is split 50/50 between 8 and 2, or "1" then "0" for ten)."""
    quoted = set(re.findall(r"'(\w+)'", block(prompt, "explanation")))
    tokens: list[tuple[str, dict[str, float]]] = []
    for tok in block(prompt, "tokens").split("\n"):
        tokens += [(tok, {}), ("\t", {})]
        if tok in quoted:
            tokens += [("8", {"8": math.log(0.5), "2": math.log(0.5), "x": -9.0})]
        elif tok == "today":  # "10": P("1") = 0.8 then P("0" | "1") = 0.5 -> 0.8 * 5.5 = 4.4
            tokens += [("1", {"1": math.log(0.8), "0": math.log(0.2)})]
            tokens += [("0", {"0": math.log(0.5), "\n": math.log(0.5)})]
        else:
            tokens += [("0", {"0": 0.0})]
        tokens.append(("\n", {}))
    text = "".join(t for t, _ in tokens)
    return Reply(text, tokens) if logprobs else text


def test_echo_simulation_parses_strictly_and_retries(serve):
    good = serve(echo_server)
    trace = FailureLog()
    sim = LLMSimulator(LLM(good.client()))
    (pred,) = sim.simulate("the word 'goal'", [TOKENS], trace)
    assert pred is not None and pred.tolist() == [0, 0, 0, 0, 8, 0, 10]
    assert not trace.failures and sim.from_digits == 1 and good.bodies[0].get("logprobs")
    assert [shown_token(t) for t in TOKENS][5] == "⏎"

    shifted = "The\t0\nstriker\t0\na\t0\ngoal\t8\n⏎\t0\ntoday\t0\nextra\t1\n"  # 'scored' dropped
    bad = serve(sequence("The 0\nstriker 0\nscored 0\na 0\ngoal 8\n\ntoday 0", shifted))
    trace = FailureLog()
    llm = LLM(bad.client(), attempts=2)
    assert LLMSimulator(llm).simulate("the word 'goal'", [TOKENS], trace) == [None]
    assert bad.calls == 2 and llm.stats.failed_attempts == {"invalid": 2}
    assert [(f.role, f.attempts) for f in trace.failures] == [("simulator", 2)]
    assert "line 3 echoes 'a' but token 3 is 'scored'" in trace.failures[0].error
    with pytest.raises(ReplyError, match="6 token lines"):
        parse_echo("The\t0\nstriker\t0\nscored\t0\na\t0\ngoal\t8\n⏎\t0", TOKENS)


def test_logprob_simulation_takes_expected_values(serve):
    server = serve(lambda p: echo_server(p, logprobs=True))
    sim = LLMSimulator(LLM(server.client()))
    (pred,) = sim.simulate("the word 'goal'", [TOKENS], FailureLog())
    assert pred is not None
    assert pred[4] == pytest.approx(5.0) and pred[6] == pytest.approx(0.8 * 5.5)
    assert pred[0] == 0 and sim.from_logprobs == 1
    assert server.bodies[0]["top_logprobs"] > 0


def list_server(prompt: str) -> str:
    """Lists the explanation's quoted word (both spellings) if the text has it, else none."""
    word = re.findall(
        r"'(\w+)'", block(prompt.split("Explanation of the neuron")[-1], "explanation")
    )
    text = block(prompt.split("Explanation of the neuron")[-1], "text")
    return f"{word[0]}, {word[0].upper()}" if word and word[0] in text.lower() else "None."


def test_list_simulation_marks_listed_words_and_rejects_invented_ones(serve):
    server = serve(list_server)
    trace = FailureLog()
    sim = LLMSimulator(LLM(server.client()), format="list")
    texts = [TOKENS, [" No", " match", " here"]]
    assert [p.tolist() for p in sim.simulate("the word 'goal'", texts, trace)] == [  # type: ignore[union-attr]
        [0, 0, 0, 0, 10, 0, 0],
        [0, 0, 0],
    ]
    assert (
        not trace.failures
        and "Copy them from the text" in server.bodies[0]["messages"][-1]["content"]
    )
    assert (sim.listed, sim.absent) == (2, 0)
    # a listed word the text lacks predicts nothing and is counted; a reply listing nothing fails
    odd = serve(sequence("goal, energy", "", "-"))
    trace = FailureLog()
    llm = LLM(odd.client(), attempts=2)
    sim = LLMSimulator(llm, format="list")
    assert sim.simulate("x", [TOKENS], trace)[0].tolist() == [0, 0, 0, 0, 10, 0, 0]  # type: ignore[union-attr]
    assert (sim.listed, sim.absent) == (2, 1) and not trace.failures
    assert sim.simulate("y", [TOKENS], trace) == [None]
    assert llm.stats.failed_attempts == {"empty": 1, "invalid": 1} and len(trace.failures) == 1
    # WordPiece pieces are matched as the words a reader sees
    pieces = ["[CLS]", "the", "story", "##tell", "##er", "won", "[SEP]"]
    got = parse_word_list("1. storyteller", pieces)
    assert got.predictions.tolist() == [0, 0, 10, 10, 10, 0, 0] and got.listed == 1
    assert parse_word_list("story", pieces).absent == 1  # a piece of a word is not a word
    with pytest.raises(ValueError, match="unknown simulation format"):
        LLMSimulator(llm, format="json")


def judge_server(prompt: str) -> Reply:
    """Says yes (P = 0.9) when the explanation's quoted word is in the text -- for fuzzing, among
    the marked tokens only."""
    word = re.findall(r"'(\w+)'", block(prompt, "explanation"))[0]
    text = block(prompt, "text")
    hits = re.findall(r"\[\[(.*?)\]\]", text) if "marked" in prompt else [text]
    p = 0.9 if any(word in h for h in hits) else 0.2
    return Reply(
        "1" if p > 0.5 else "0",
        [("1" if p > 0.5 else "0", {"1": math.log(p), "0": math.log(1 - p)})],
    )


def test_detection_and_fuzzing_judges(serve):
    server = serve(judge_server)
    rec = synthetic()
    texts = [r.tokens for r in rec.held_out]
    labels = np.array([r.max_activation >= rec.threshold for r in rec.held_out])
    trace = FailureLog()
    det = LLMJudge(LLM(server.client()))
    good = judged(det.judge("the word 'goal'", texts, None, trace), labels)
    wrong = judged(det.judge("the word 'vote'", texts, None, trace), labels)
    assert good.auc > wrong.auc and good.balanced_accuracy > 0.6 and not trace.failures

    ftexts, marks, flabels = fuzz_set(rec.held_out, rec.threshold, seed=0)
    assert len(flabels) and flabels.sum() == (~flabels).sum()
    scores = LLMJudge(LLM(server.client())).judge(
        "the word 'goal'", [r.tokens for r in ftexts], marks, trace
    )
    assert "[[" in server.bodies[-1]["messages"][1]["content"] and None not in scores
    assert judged(scores, flabels).auc > 0.5

    bad = serve(sequence("maybe"))
    failed = LLMJudge(LLM(bad.client(), attempts=2)).judge(
        "the word 'goal'", texts[:3], None, trace
    )
    assert failed == [None, None, None] and len(trace.failures) == 3


def test_failed_replies_are_counted_never_cached_and_asked_again(serve, tmp_path):
    failing = serve(
        sequence(
            Reply(raw=b"{not json"),  # malformed body
            "",  # empty reply
            Reply(raw=b'{"id": "x", "choices": []}'),  # no choices
            400,  # HTTP error
            "no JSON here",  # invalid schema
        )
    )
    messages = [{"role": "user", "content": "explain"}]

    def validate(c: Completion) -> dict:
        return parse_json(c.text)

    llm = LLM(failing.client(max_retries=0), ResponseCache(tmp_path), attempts=5)
    value, error = llm.ask(messages, validate)
    assert value is None and error == "invalid: no JSON object found in reply"
    assert llm.stats.failed_attempts == {"malformed": 1, "empty": 2, "http": 1, "invalid": 1}
    assert (llm.stats.steps, llm.stats.failed_steps, llm.stats.requests) == (1, 1, 5)
    assert "0 ok, 1 failed of 1" in llm.stats.summary()
    assert not list(tmp_path.rglob("*.json"))  # nothing cached

    fixed = serve(sequence('{"ok": 1}'))
    again = LLM(fixed.client(), ResponseCache(tmp_path))
    assert again.ask(messages, validate)[0] == {"ok": 1} and fixed.calls == 1
    third = LLM(fixed.client(), ResponseCache(tmp_path))
    assert third.ask(messages, validate)[0] == {"ok": 1} and fixed.calls == 1
    assert third.stats.cache_hits == 1


def test_timeout_bounds_a_hanging_server(serve):
    server = serve(lambda _p: Reply("late", delay=30))
    llm = LLM(server.client(timeout=1, max_retries=0), attempts=2, give_up_after=2)
    messages = [{"role": "user", "content": "hi"}]
    assert llm.ask(messages, lambda c: c.text) == (None, "timeout: no reply within 1 s")
    with pytest.raises(LLMUnavailable, match="2 LLM steps in a row failed.*timeout"):
        llm.ask(messages, lambda c: c.text)
    assert llm.stats.failed_attempts == {"timeout": 4} and server.calls == 4


def test_explainer_is_contrastive_and_rejects_echoes(serve):
    rec = synthetic()
    server = serve(
        sequence(
            '{"explanation": "Add / Split / Merge / Reword", "keywords": ["goal"]}',
            '{"explanation": "<<<TEXT exemplar 0 the goal", "keywords": ["goal"]}',
            "{\"explanation\": \"football words like 'goal' and 'match'\"}",
        )
    )
    trace = FailureLog()
    mode = LLMExplainer(LLM(server.client())).explain_top(rec, 5, trace)
    assert mode.explanation == "football words like 'goal' and 'match'" and not trace.failures
    first = server.bodies[0]["messages"]
    prompt = first[-1]["content"]
    assert "activating 0" in prompt and "not activating 0" in prompt and "[[" in prompt
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user"]  # worked example
    errors = [b["messages"][-1]["content"] for b in server.bodies[1:]]
    assert "repeats the instructions" in errors[0] and "repeats the marker" in errors[1]
    assert check_explanation("the word 'the'") == "the word 'the'"
    with pytest.raises(ReplyError):
        check_explanation("explain the neuron")
    for pointer in ("the phrase 'GM' is used in the second text", "goals in example 3"):
        with pytest.raises(ReplyError, match="never sees"):
            check_explanation(pointer)
    assert check_explanation("the text of a contract") == "the text of a contract"


@pytest.fixture
def topics_csv(tmp_path):
    rng = np.random.default_rng(0)
    words = {
        "sport": ["goal", "match", "team", "striker", "cup", "league"],
        "money": ["shares", "bank", "market", "profit", "rates", "fund"],
        "tech": ["phone", "chip", "software", "screen", "camera", "data"],
    }
    rows = [
        {"text": "The " + " ".join(rng.choice(ws, size=10)) + ".", "label": label}
        for label, ws in words.items()
        for _ in range(50)
    ]
    path = tmp_path / "topics.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def explain_cli(model_dir, csv, url, out, *extra: str):
    args = ["explain", "--model", str(model_dir), "--dataset", str(csv), "--layer", "1"]
    args += ["--neurons", "3", "--rounds", "1", "--backend", "openai", "--base-url", url]
    return CliRunner().invoke(app, [*args, "--out", str(out), *extra])


def test_mostly_failed_llm_run_exits_nonzero(serve, tiny_model_dir, topics_csv, tmp_path):
    server = serve(sequence("I think the neuron likes sports."))
    result = explain_cli(
        tiny_model_dir, topics_csv, server.url, tmp_path / "out", "--max-attempts", "2"
    )
    assert result.exit_code == 1, result.output
    assert "LLM steps: 0 ok" in result.output and "invalid" in result.output
    assert server.bodies and all(b["model"] == "smollm2-135m" for b in server.bodies)

    hanging = serve(lambda _p: Reply("late", delay=30))
    result = explain_cli(
        tiny_model_dir,
        topics_csv,
        hanging.url,
        tmp_path / "out2",
        "--timeout",
        "1",
        "--max-attempts",
        "1",
    )
    assert result.exit_code == 2 and "in a row failed" in result.output
    assert "0 ok" in result.output and "timeout" in result.output
    assert hanging.calls <= 5 + 3  # stopped early (steps already in flight may still finish)

    wordy = serve(lambda _p: "x" * 5_000)
    result = explain_cli(
        tiny_model_dir, topics_csv, wordy.url, tmp_path / "out3", "--max-reply-mb", "0.001"
    )
    assert result.exit_code == 2 and "in a row failed" in result.output
    assert "too_large" in result.output and "--max-reply-mb" in result.output
    assert not (tmp_path / "out3").exists()


def scripted_roles(prompt: str) -> str | Reply:
    """Valid answers for every LLM role (the refiner's aside), echo simulation for the simulator."""
    if "Copy each of the" in prompt:
        return echo_server(prompt)
    if "Copy them from the text" in prompt:
        return list_server(prompt)
    if "make the neuron fire" in prompt:
        return '{"components": ["goal", "match"]}'
    if "groups of related meaning" in prompt:
        return '{"modes": [{"label": "sport", "components": [0, 1]}]}'
    if "improved description" in prompt:
        return "no"
    return '{"explanation": "sport words such as \'goal\'", "keywords": ["goal"]}'


@pytest.mark.parametrize(
    ("simulator", "asked"), [("llm", "Copy each of the"), ("llm-list", "Copy them from the text")]
)
def test_cli_selects_the_llm_simulator(
    serve, tiny_model_dir, topics_csv, tmp_path, simulator, asked
):
    server = serve(scripted_roles)
    result = explain_cli(
        tiny_model_dir, topics_csv, server.url, tmp_path / "out", "--simulator", simulator
    )
    assert result.exit_code == 0, result.output
    prompts = [b["messages"][-1]["content"] for b in server.bodies]
    assert any(asked in p and "'goal'" in p for p in prompts)
    assert "LLM steps:" in result.output
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["metadata"]
    assert meta["simulator"] == simulator  # each number says what produced it
    assert meta["judges"][0] == "llm" and meta["judges"][1].startswith("embedding")
    auto = explain_cli(tiny_model_dir, topics_csv, server.url, tmp_path / "auto")
    assert auto.exit_code == 0, auto.output  # an LLM backend simulates with the LLM by default
    assert (
        json.loads((tmp_path / "auto" / "results.json").read_text())["metadata"]["simulator"]
        == "llm"
    )
    lexical = explain_cli(
        tiny_model_dir, topics_csv, server.url, tmp_path / "lex", "--simulator", "lexical"
    )
    assert lexical.exit_code == 2 and "never scored by word matching" in lexical.output
    bad = explain_cli(tiny_model_dir, topics_csv, server.url, tmp_path / "o", "--simulator", "x")
    assert (
        bad.exit_code == 2
        and "unknown simulator 'x'; valid: 'auto', 'lexical', 'llm', 'llm-list'" in bad.output
    )
