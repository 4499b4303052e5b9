"""One request never harms another: hostile inputs, huge bodies, a full queue, clients that leave, failures inside
the engine; and the official client's usual streaming loops."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest
from conftest import SERVING_CONTEXT, micro_model, running_app

from onebox.errors import OneboxError
from onebox.infer.engine import Engine, Request
from onebox.serve import Server, create_app

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

CONTEXT = SERVING_CONTEXT


@pytest.fixture(scope="module")
def served(serving_model, corpus_tokenizer):
    """A server with a 64 KiB body limit, two slots and a queue of two."""
    engine = Engine(serving_model, max_batch=2, max_queue=2).start()
    with running_app(create_app(Server(engine, corpus_tokenizer, "micro", max_n=8), max_body_bytes=64 * 1024)) as url:
        yield url, engine
    engine.stop()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0)


def _idle(engine, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline and (engine.pending or any(engine.slots)):
        time.sleep(0.02)
    return not engine.pending and not any(engine.slots)


def test_a_seed_past_64_bits_is_refused_and_the_others_go_on(served, client):
    url, engine = served
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [
            pool.submit(
                lambda: "".join(
                    c.choices[0].text
                    for c in client.completions.create(
                        model="micro", prompt=[1, 2, 3], max_tokens=20, temperature=0.8, seed=2**63 - 1, stream=True
                    )
                )
            )
            for _ in range(2)
        ]
        bad = httpx.post(
            f"{url}/v1/completions", json={"model": "micro", "prompt": "x", "seed": 18446744073709551616}, timeout=10
        )
        texts = [s.result(timeout=60) for s in streams]
    assert bad.status_code == 400 and "seed" in bad.json()["error"]["message"]
    assert all(texts) and texts[0] == texts[1]  # the same seed (the largest there is) gives the same sample
    assert _idle(engine)


def test_a_request_that_fails_inside_the_engine_ends_alone(serving_model):
    engine = Engine(serving_model, max_batch=3).start()
    try:
        good = [Request([1, 2, 3], 8, temperature=0), Request([4, 5], 8, temperature=0)]
        bad = Request([6, 7], 8, temperature=0.5, seed=1)
        real = engine._sample

        def failing(active, logits):
            if active.request is bad:
                raise OverflowError("Overflow when unpacking long long")
            return real(active, logits)

        engine._sample = failing
        engine.submit_all([good[0], bad, good[1]])
        tokens = [list(r.tokens(timeout=60)) for r in good]
        list(bad.tokens(timeout=60))
        assert bad.finish_reason == "error" and "Overflow" in bad.error
        assert [len(t) for t in tokens] == [8, 8] and all(r.finish_reason == "length" for r in good)
        assert _idle(engine) and engine.thread.is_alive()
    finally:
        engine.stop()


def test_a_body_over_the_limit_is_413_and_health_stays_quick(served):
    url, engine = served
    big = json.dumps({"model": "micro", "prompt": "a" * 200_000}).encode()
    declared = httpx.post(
        f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=10
    )
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is counted as the bytes arrive
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = httpx.post(
        f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=10
    )
    assert streamed.status_code == 413
    assert httpx.get(f"{url}/healthz", timeout=2).json()["status"] == "ok"


def test_a_prompt_far_past_the_context_is_refused_by_its_length(served, corpus_tokenizer):
    url, _ = served
    server = Server(Engine.__new__(Engine), corpus_tokenizer, "micro")  # the check alone, on a model of this context
    server.engine.config = micro_model(seq_len=CONTEXT)
    calls = []
    real = corpus_tokenizer.encode
    server.tokenizer = type("Counting", (), {"encode": lambda self, *a, **k: calls.append(1) or real(*a, **k)})()
    with pytest.raises(Exception, match="far longer than this model's context"):
        server.encode("word " * 20_000, "prompt")
    assert calls == []  # refused before tokenizing
    answer = httpx.post(f"{url}/v1/completions", json={"model": "micro", "prompt": "word " * 10_000}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"


def test_a_full_queue_answers_429(served):
    url, engine = served
    held = engine.submit_all([Request([1, 2, 3], CONTEXT - 4, temperature=0) for _ in range(2)])
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not all(engine.slots):
            time.sleep(0.01)
        held += engine.submit_all(
            [Request([1, 2, 3], CONTEXT - 4, temperature=0) for _ in range(2)]
        )  # two slots busy, two waiting
        answer = httpx.post(
            f"{url}/v1/completions", json={"model": "micro", "prompt": [1, 2], "max_tokens": 2}, timeout=10
        )
        assert answer.status_code == 429 and answer.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(OneboxError, match="busy"):
            engine.submit(Request([1], 2))
    finally:
        for request in held:
            request.cancel()
    assert _idle(engine)


def test_a_non_streaming_client_that_leaves_is_cancelled(serving_model, corpus_tokenizer):
    engine = Engine(serving_model, max_batch=2)
    step = engine._decode
    engine._decode = lambda: (time.sleep(0.02), step())[1]  # 20 ms a token: the whole request would take ~2 s
    engine.start()
    try:
        with running_app(create_app(Server(engine, corpus_tokenizer, "micro"))) as url:
            body = json.dumps(
                {"model": "micro", "prompt": [1, 2, 3], "max_tokens": CONTEXT - 4, "n": 2, "temperature": 0}
            ).encode()
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                deadline = time.time() + 10
                while time.time() < deadline and not any(engine.slots):
                    time.sleep(0.005)
            assert _idle(engine, timeout=10)
            assert engine.emitted < CONTEXT - 4  # both choices ended long before their max_tokens
            assert (
                httpx.post(
                    f"{url}/v1/completions", json={"model": "micro", "prompt": [1], "max_tokens": 2}, timeout=10
                ).status_code
                == 200
            )
    finally:
        engine.stop()


def test_a_lone_surrogate_is_a_400_in_json(served):
    url, _ = served
    raw = b'{"model": "micro", "prompt": "a\\ud800b"}'
    answer = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert answer.status_code == 400 and "surrogate" in answer.json()["error"]["message"]
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        content=b'{"model": "micro", "messages": [{"role": "user", "content": "\\udfff"}]}',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert chat.status_code == 400 and chat.headers["content-type"].startswith("application/json")


def test_the_official_clients_usual_streaming_loops(client):
    chat = dict(
        model="micro", messages=[{"role": "user", "content": "Speak."}], max_tokens=6, temperature=0, stream=True
    )
    plain = list(client.chat.completions.create(**chat))
    text = "".join(
        chunk.choices[0].delta.content or "" for chunk in plain
    )  # the loop of the client's README: no chunk without a choice
    assert all(chunk.usage is None for chunk in plain)
    counted = list(client.chat.completions.create(**chat, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens >= 1
    assert "".join(chunk.choices[0].delta.content or "" for chunk in counted[:-1]) == text
    completion = dict(model="micro", prompt="To be", max_tokens=6, temperature=0, stream=True)
    pieces = "".join(chunk.choices[0].text for chunk in client.completions.create(**completion))
    counted = list(client.completions.create(**completion, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens >= 1
    assert "".join(chunk.choices[0].text for chunk in counted[:-1]) == pieces


def test_a_hostile_chat_template_in_a_served_folder_runs_no_code(serving_model, corpus_tokenizer, tmp_path):
    from onebox.chat import ChatTemplate

    marker = tmp_path / "pwned"
    template = ChatTemplate("{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}")
    engine = Engine(serving_model, max_batch=1).start()
    try:
        with running_app(create_app(Server(engine, corpus_tokenizer, "micro", chat_template=template))) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "micro", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            refusing = ChatTemplate("{{ raise_exception('only user and assistant roles are supported') }}")
            assert answer.status_code == 400 and not marker.exists()
        with running_app(create_app(Server(engine, corpus_tokenizer, "micro", chat_template=refusing))) as url:
            answer = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "micro", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
            assert answer.status_code == 400 and "only user and assistant roles" in answer.json()["error"]["message"]
    finally:
        engine.stop()


def test_serve_refuses_a_taken_port_before_loading_the_model(tmp_path):
    from onebox.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.time()
        assert main(["serve", str(tmp_path / "no-model-here"), "--port", str(port)]) == 1
        assert time.time() - started < 5


def test_requests_for_threads_are_not_held_after_their_end(served):
    """A request borrows a thread from the server's bounded worker pool and gives it back: after rounds of
    six concurrent requests no thread of its own is left, and the pool holds at most one worker per request
    that ran at once."""
    url, engine = served

    def others() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name != "AnyIO worker thread")

    def one_round() -> set[int]:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            return set(
                pool.map(
                    lambda i: (
                        httpx.post(
                            f"{url}/v1/completions",
                            json={"model": "micro", "prompt": [i + 1], "max_tokens": 4},
                            timeout=30,
                        ).status_code
                    ),
                    range(6),
                )
            )

    before = others()
    for _ in range(5):
        assert one_round() <= {200, 429}
    assert _idle(engine)
    assert others() == before
    assert threading.active_count() - len(before) <= 6
