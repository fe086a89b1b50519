"""LLM backends against a real OpenAI-compatible HTTP server on 127.0.0.1 (scripted replies)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_explain_core import synthetic

from rangelens.explain import (
    LLM,
    LLMUnavailable,
    OpenAIClient,
    ResponseCache,
    explain_record,
    make_roles,
    save_results,
)
from rangelens.explain.clients import Completion
from rangelens.explain.lexical import LexicalSimulator
from rangelens.explain.llm import LLMExplainer
from rangelens.explain.roles import FailureLog

SECRET = "sk-test-SECRET-0123456789"


@dataclass
class Reply:
    """A scripted reply: content with optional per-token top log-probabilities (``tokens`` spell
    the content), or a raw body sent as is, or a delay before answering; ``drip`` sends the
    ``"headers"`` (after the status line) or the ``"body"`` one byte every 0.3 s; ``length=False``
    sends no Content-Length (the body ends when the connection closes)."""

    content: str = ""
    tokens: list[tuple[str, dict[str, float]]] | None = None
    raw: bytes | None = None
    delay: float = 0.0
    drip: str = ""
    length: bool = True


Answer = str | int | Reply


class Server:
    """Replies come from ``reply(prompt_text)``: a string, an int HTTP status to fail with, or a
    :class:`Reply`. ``bodies`` keeps every request body."""

    def __init__(self, reply: Callable[[str], Answer]) -> None:
        self.reply = reply
        self.calls = 0
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.stopped = threading.Event()  # ends drips when the test is over
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                outer.bodies.append(body)
                outer.auth.add(self.headers.get("Authorization", ""))
                prompt = "\n".join(m["content"] for m in body["messages"])
                answer = outer.reply(prompt)
                if isinstance(answer, int):
                    self.send_response(answer)
                    self.end_headers()
                    return
                answer = answer if isinstance(answer, Reply) else Reply(answer)
                if answer.delay:
                    time.sleep(answer.delay)
                payload = answer.raw or json.dumps(chat_completion(body, answer)).encode()
                if answer.drip:
                    self.drip(payload, answer.drip)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if answer.length:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout)
                    self.wfile.write(payload)
                self.close_connection = not answer.length

            def drip(self, payload: bytes, part: str) -> None:
                status = b"HTTP/1.1 200 OK\r\n"
                head = f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                raw = status + head.encode() + payload
                sent = len(status) if part == "headers" else len(raw) - len(payload)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.wfile.write(raw[:sent])
                    while sent < len(raw) and not outer.stopped.wait(0.3):
                        self.wfile.write(raw[sent : sent + 1])
                        sent += 1

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def client(self, **kw: object) -> OpenAIClient:
        return OpenAIClient(self.url, "scripted", api_key_env="RL_TEST_KEY", backoff=0.01, **kw)  # type: ignore[arg-type]


def chat_completion(body: dict, answer: Reply) -> dict:
    """An OpenAI chat-completion response; log-probabilities only when the request asked."""
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": answer.content},
        "finish_reason": "stop",
    }
    if body.get("logprobs") and answer.tokens is not None:
        assert "".join(t for t, _ in answer.tokens) == answer.content
        choice["logprobs"] = {
            "content": [
                {
                    "token": tok,
                    "logprob": top.get(tok, -0.01),
                    "bytes": None,
                    "top_logprobs": [
                        {"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()
                    ][: body.get("top_logprobs", 0)],
                }
                for tok, top in answer.tokens
            ]
        }
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [choice],
    }


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    monkeypatch.setenv("RL_TEST_KEY", SECRET)
    servers: list[Server] = []

    def start(reply: Callable[[str], Answer]) -> Server:
        servers.append(Server(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.stopped.set()
        s.httpd.shutdown()


def sequence(*replies: Answer) -> Callable[[str], Answer]:
    queue = list(replies)
    return lambda _prompt: queue.pop(0) if len(queue) > 1 else queue[0]


def test_retries_server_errors_with_backoff(serve):
    server = serve(sequence(500, 503, "hello"))
    reply = server.client(max_retries=3).complete([{"role": "user", "content": "hi"}])
    assert reply.text == "hello" and reply.logprobs is None
    assert server.calls == 3
    assert server.auth == {f"Bearer {SECRET}"}


def test_malformed_replies_are_retried_then_recorded(serve):
    rec = synthetic()
    good = '{"explanation": "sports words", "keywords": ["goal", "match"]}'
    server = serve(sequence("no json at all", '{"explanation": "x", "keywords": [NaN]}', good))
    trace = FailureLog()
    mode = LLMExplainer(LLM(server.client())).explain_top(rec, 5, trace)
    assert server.calls == 3 and not trace.failures
    assert {c.text for c in mode.components} == {"goal", "match"}

    bad = serve(sequence('{"explanation": ""}'))
    trace = FailureLog()
    mode = LLMExplainer(LLM(bad.client())).explain_top(rec, 5, trace)
    assert bad.calls == 3 and mode.components == []
    assert [(f.role, f.attempts) for f in trace.failures] == [("explainer", 3)]


def scripted_llm(prompt: str) -> str:
    if "improved description" in prompt:
        return "I think the neuron likes sports."  # never valid: the refiner step fails
    if "groups of related meaning" in prompt:
        return (
            '{"modes": [{"label": "sports", "components": [0, 1]}, '
            '{"label": "x", "components": [99]}]}'
            if "Invalid" not in prompt
            else '{"modes": [{"label": "sports", "components": [0]}]}'
        )
    if "make the neuron fire" in prompt:
        return '```json\n{"components": ["goal", "match"]}\n```'
    return (
        '{"explanation": "football words such as \'goal\'", "keywords": ["goal", "team", "shares"]}'
    )


def test_llm_loop_end_to_end_cached_and_key_free(serve, tmp_path: Path):
    rec = synthetic()
    server = serve(scripted_llm)
    # this test is about the LLM roles' loop and cache: the lexical simulator scores (offline), as
    # the scripted server answers no simulation prompt
    offline = {"simulator": LexicalSimulator(), "judge": None}
    roles = replace(
        make_roles("openai", server.client(max_concurrency=3), cache_dir=tmp_path / "cache"),
        **offline,
    )
    first = explain_record(rec, roles, rounds=2)
    assert first.modes and first.iterative.held_out > 0.3
    assert any(f.role == "refiner" for f in first.failures)
    assert not any(f.role == "clusterer" for f in first.failures)  # fixed on retry
    calls = server.calls
    assert calls > 0

    again = replace(make_roles("openai", server.client(), cache_dir=tmp_path / "cache"), **offline)
    second = explain_record(rec, again, rounds=2)
    assert second.to_dict() == first.to_dict()
    # validated replies come from the cache; the failed refiner steps are asked again
    refiner_failures = sum(f.role == "refiner" for f in first.failures)
    assert server.calls - calls == 3 * refiner_failures
    assert isinstance(again.explainer, LLMExplainer)
    stats = again.explainer.llm.stats
    assert stats.cache_hits == stats.steps - refiner_failures > 0
    assert stats.failed_attempts == {"invalid": 3 * refiner_failures}

    save_results(tmp_path / "out", [rec], [first], {"backend": "openai", "base_url": server.url})
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path


def test_unreachable_server_names_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    client = OpenAIClient(url, "m", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(LLMUnavailable, match=f"LLM server at {url}"):
        client.complete([{"role": "user", "content": "hi"}])


def test_cache_key_ignores_nothing_but_identity(tmp_path: Path):
    cache = ResponseCache(tmp_path)
    k1 = cache.key("a", [{"role": "user", "content": "x"}])
    assert k1 != cache.key("b", [{"role": "user", "content": "x"}])
    assert k1 != cache.key("a", [{"role": "user", "content": "y"}])
    cache.put(k1, "a", Completion("reply"))
    assert cache.get(k1) == Completion("reply")


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_timeout_bounds_the_whole_request_of_a_server_that_drips_bytes(serve, drip):
    server = serve(lambda _p: Reply("slow", drip=drip))  # a byte every 0.3 s: no read times out
    llm = LLM(server.client(timeout=2, max_retries=0), attempts=1)
    start = time.monotonic()
    answer = llm.ask([{"role": "user", "content": "hi"}], lambda c: c.text)
    assert time.monotonic() - start < 2 + 1.5
    assert answer == (None, "timeout: no reply within 2 s")
    assert llm.stats.failed_attempts == {"timeout": 1}


@pytest.mark.parametrize("length", [True, False])  # with or without a Content-Length
def test_replies_over_the_size_cap_are_counted_failures_never_cached(serve, tmp_path, length):
    messages = [{"role": "user", "content": "hi"}]
    huge = serve(lambda _p: Reply("x" * 10_000_000, length=length))  # 10 MB
    llm = LLM(huge.client(), ResponseCache(tmp_path / "cache"), attempts=2)
    value, error = llm.ask(messages, lambda c: c.text)
    assert value is None and error.startswith("too_large: reply larger than 4 MB")
    assert llm.stats.failed_attempts == {"too_large": 2} and huge.calls == 2
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written
    small = serve(lambda _p: Reply("y" * 50_000, length=length))
    capped = LLM(small.client(max_reply_mb=0.01), attempts=1)
    assert capped.ask(messages, lambda c: c.text) == (
        None,
        "too_large: reply larger than 0.01 MB (--max-reply-mb)",
    )
    assert LLM(small.client(max_reply_mb=0.1)).ask(messages, lambda c: c.text)[0] == "y" * 50_000
