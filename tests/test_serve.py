"""The decode engine and the OpenAI-compatible server, driven by the official openai client on localhost."""

from __future__ import annotations

import concurrent.futures
import io
import json
import time

import httpx
import pytest
import torch
from conftest import SERVING_CONTEXT, free_port, micro_model, running_app

from onebox.errors import OneboxError
from onebox.infer.engine import Engine, Request
from onebox.infer.generate import generate
from onebox.model import Transformer
from onebox.serve import Server, create_app, run_jsonl

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

CONTEXT = SERVING_CONTEXT


@pytest.fixture(scope="module")
def model(serving_model):
    return serving_model


@pytest.fixture(scope="module")
def tokenizer(corpus_tokenizer):
    return corpus_tokenizer


def _prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 512, (int(n),), generator=generator).tolist()
        for n in torch.randint(2, 20, (count,), generator=generator)
    ]


def test_batched_decode_gives_the_one_at_a_time_greedy_tokens(model):
    prompts = _prompts(7)
    expected = [generate(model, p, 25, temperature=0).samples[0] for p in prompts]
    engine = Engine(model, max_batch=3, prefix_entries=0).start()
    try:
        requests = [
            engine.submit(Request(p, 25, temperature=0)) for p in prompts
        ]  # more requests than slots: they queue and join
        got = [list(r.tokens(timeout=60)) for r in requests]
    finally:
        engine.stop()
    assert got == expected
    assert engine.most_active == 3 and all(r.finish_reason == "length" for r in requests)
    assert engine.decode_steps < sum(len(t) for t in got)  # decoded together, not one after another


def test_one_batched_prefill_of_mixed_requests_gives_each_ones_own_tokens(model):
    """Greedy and seeded sampled requests of different lengths, one filling the context to its end and one
    starting from a cached prefix, prefilled together and decoded together: each equals generate() alone."""
    prompts = _prompts(5, seed=3)
    shared = prompts[0] + [11, 12]
    cases = [
        (prompts[0], 9, 0.0, 0, 1.0, None),
        (prompts[1], 14, 0.9, 40, 1.0, 7),
        (prompts[2], CONTEXT - len(prompts[2]), 0.0, 0, 1.0, None),
        (prompts[3], 5, 1.2, 0, 0.8, 3),
        (shared, 12, 0.0, 0, 1.0, None),
    ]
    expected = [generate(model, p, n, temperature=t, top_k=k, top_p=q, seed=s).samples[0] for p, n, t, k, q, s in cases]
    engine = Engine(model, max_batch=4)
    warm = engine.submit(Request(list(prompts[0]), 1, temperature=0))
    while warm.finish_reason is None:
        engine.step()
    requests = [engine.submit(Request(list(p), n, t, k, q, s)) for p, n, t, k, q, s in cases]
    while engine.pending or any(engine.slots):
        engine.step()
    got = [list(r.tokens(timeout=1)) for r in requests]
    assert got == expected
    assert requests[4].cached_tokens == len(prompts[0])  # the shared prefix came from the cache
    assert [r.finish_reason for r in requests] == ["length"] * 5


def test_a_warmed_up_engine_gives_generates_tokens(model):
    engine = Engine(model, max_batch=2)
    calls = []
    original = engine._decode
    engine._decode = lambda: (calls.append(1), original())[1]
    engine.warmup()
    assert len(calls) == 3 and int(engine.positions.max()) == 0
    prompt = _prompts(1, seed=9)[0]
    request = engine.submit(Request(list(prompt), 6, temperature=0))
    with pytest.raises(OneboxError, match="before submitting"):
        engine.warmup()
    while request.finish_reason is None or engine.pending or any(engine.slots):
        engine.step()
    assert list(request.tokens(timeout=1)) == generate(model, prompt, 6, temperature=0).samples[0]


def test_prefix_cache_hits_give_the_same_tokens_as_misses(model):
    shared = _prompts(1, seed=5)[0] * 2
    engine = Engine(model, max_batch=2).start()
    try:
        first = engine.submit(Request(shared + [7, 8], 20, temperature=0))
        first_tokens = list(first.tokens(timeout=60))
        second = engine.submit(Request(shared + [9], 20, temperature=0))
        second_tokens = list(second.tokens(timeout=60))
    finally:
        engine.stop()
    assert first.cached_tokens == 0 and second.cached_tokens == len(shared)
    assert second_tokens == generate(model, shared + [9], 20, temperature=0).samples[0]
    assert first_tokens == generate(model, shared + [7, 8], 20, temperature=0).samples[0]


def test_a_cancelled_request_frees_its_slot(model):
    engine = Engine(model, max_batch=1).start()
    try:
        long = engine.submit(Request([1, 2, 3], CONTEXT - 3, temperature=0))
        next(long.tokens(timeout=60))
        long.cancel()
        waiting = engine.submit(Request([4, 5], 5, temperature=0))
        assert len(list(waiting.tokens(timeout=60))) == 5  # it got the only slot
        list(long.tokens(timeout=60))
    finally:
        engine.stop()
    assert long.finish_reason == "cancelled"


@pytest.fixture(scope="module")
def server(model, tokenizer):
    engine = Engine(model, max_batch=4).start()
    with running_app(create_app(Server(engine, tokenizer, "micro", max_n=4))) as url:
        yield url, engine
    engine.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="none", max_retries=0)


def test_health_and_models(server, client):
    assert httpx.get(f"{server[0]}/healthz").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["micro"]


def test_completion_text_and_token_ids(client, model, tokenizer):
    done = client.completions.create(model="micro", prompt="To be, or not", max_tokens=12, temperature=0, n=2)
    assert len(done.choices) == 2 and done.choices[0].text == done.choices[1].text  # greedy: the same
    assert done.choices[0].finish_reason in ("stop", "length")
    assert (
        done.usage.prompt_tokens > 1
        and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    )
    ids = client.completions.create(model="micro", prompt=[5, 6, 7], max_tokens=8, temperature=0)
    assert ids.choices[0].finish_reason == "length" and ids.usage.completion_tokens == 8
    expected = generate(model, [5, 6, 7], 8, temperature=0).samples[0]
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].text == tokenizer.decode(
        expected
    )  # the server's greedy = generate's


def test_seeded_sampling_repeats(client):
    a = client.completions.create(model="micro", prompt="Hamlet", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = client.completions.create(model="micro", prompt="Hamlet", max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text


def test_streaming_completion_matches_the_whole_one(client):
    whole = client.completions.create(model="micro", prompt="Lear", max_tokens=15, temperature=0)
    parts, reasons = [], []
    for chunk in client.completions.create(model="micro", prompt="Lear", max_tokens=15, temperature=0, stream=True):
        for choice in chunk.choices:
            parts.append(choice.text)
            reasons.append(choice.finish_reason)
    assert "".join(parts) == whole.choices[0].text and reasons[-1] == whole.choices[0].finish_reason


def test_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Who is there?"}]
    whole = client.chat.completions.create(model="micro", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="micro", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert text == whole.choices[0].message.content


def test_stop_sequences_cut_the_text(client):
    free = client.completions.create(model="micro", prompt=[1, 2, 3], max_tokens=30, temperature=0).choices[0].text
    stop = free[5:8]
    assert stop and stop in free
    cut = client.completions.create(model="micro", prompt=[1, 2, 3], max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_prefix_cache_reported_in_usage(client):
    prompt = [11, 12, 13, 14, 15, 16, 17, 18]
    client.completions.create(model="micro", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="micro", prompt=prompt + [19], max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt)


@pytest.mark.parametrize(
    "kwargs,status,fragment",
    [
        (dict(model="nope", prompt="x"), 404, "does not exist"),
        (dict(model="micro", prompt=""), 400, "empty"),
        (dict(model="micro", prompt="x", max_tokens=0), 400, "max_tokens"),
        (dict(model="micro", prompt=[1, 2], max_tokens=CONTEXT), 400, "context"),
        (dict(model="micro", prompt=list(range(CONTEXT + 5))), 400, "context"),
        (dict(model="micro", prompt="x", n=99), 400, "n must be"),
        (dict(model="micro", prompt="x", temperature=-1), 400, "temperature"),
        (dict(model="micro", prompt=[1, 10**6]), 400, "token ids"),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, status, fragment):
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**kwargs)
    assert caught.value.status_code == status and fragment in caught.value.message


def test_malformed_bodies_get_400_and_the_server_lives(server):
    url = server[0]
    bad_json = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    wrong_type = httpx.post(f"{url}/v1/completions", json={"model": "micro", "prompt": "x", "max_tokens": "many"})
    assert wrong_type.status_code == 400 and "max_tokens" in wrong_type.json()["error"]["message"]
    no_messages = httpx.post(f"{url}/v1/chat/completions", json={"model": "micro", "messages": []})
    assert no_messages.status_code == 400
    bad_role = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "micro", "messages": [{"role": "robot", "content": "hi"}]}
    )
    assert bad_role.status_code == 400 and "role" in bad_role.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz").status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    url, engine = server
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "micro", "prompt": [1, 2], "max_tokens": CONTEXT - 3, "temperature": 0, "stream": True},
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while any(engine.slots) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(engine.slots)


def test_concurrent_streaming_clients(server):
    url, engine = server

    def one(i: int) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        return "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="micro", prompt=[i + 1, i + 2], max_tokens=20, temperature=0, stream=True
            )
            if c.choices
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert engine.most_active >= 2  # they were decoded together


def test_generate_jsonl(model, tokenizer):
    engine = Engine(model, max_batch=2).start()
    out = io.StringIO()
    lines = [
        json.dumps({"id": "a", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}),
        "{oops",
        json.dumps({"prompt": "Kent", "n": 2, "max_tokens": 3}),
    ]
    try:
        failed = run_jsonl(Server(engine, tokenizer, "micro"), lines, lambda text: out.write(text + "\n"))
    finally:
        engine.stop()
    responses = [json.loads(line) for line in out.getvalue().splitlines()]
    assert failed == 1 and len(responses) == 3
    assert responses[0]["id"] == "a" and responses[0]["usage"]["completion_tokens"] == 5
    assert "error" in responses[1] and len(responses[2]["choices"]) == 2


def test_bench_decode_writes_a_valid_document_with_the_baseline(tmp_path):
    pytest.importorskip("transformers")
    from onebox.bench.schema import read_document, validate_document
    from onebox.cli import main

    out = tmp_path / "decode.json"
    assert (
        main(
            [
                "bench",
                "decode",
                "--preset",
                "tiny",
                "--batches",
                "1,2",
                "--prompt-len",
                "16",
                "--new-tokens",
                "8",
                "--baseline",
                "hf",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = read_document(out)
    assert validate_document(doc) == [] and [e["batch"] for e in doc["entries"]] == [1, 2]
    result = doc["entries"][1]["result"]
    assert result["decode_tokens_per_second"] > 0 and result["baseline"]["decode_tokens_per_second"] > 0
    assert result["baseline"]["static_decode_tokens_per_second"] > 0 and result["baseline"]["static_ratio"] > 0
    assert result["bound_fraction"] is None  # no memory bandwidth measured on a CPU: n/a, not a guess
    assert main(["bench", "decode"]) == 1 and main(["bench", "decode", "--preset", "tiny", "--new-tokens", "9999"]) == 1


def test_bench_serve_drives_concurrent_clients(tmp_path):
    from onebox.bench.schema import read_document, validate_document
    from onebox.cli import main

    out = tmp_path / "serve.json"
    assert (
        main(
            [
                "bench",
                "serve",
                "--preset",
                "tiny",
                "--clients",
                "1,3",
                "--max-tokens",
                "8",
                "--prompt-len",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = read_document(out)
    assert validate_document(doc) == [] and [e["result"]["tokens"] for e in doc["entries"]] == [
        8,
        24,
    ]  # every token of every client arrived
    assert doc["entries"][1]["result"]["ttft_p95_ms"] >= doc["entries"][1]["result"]["ttft_p50_ms"]
    assert main(["bench", "serve", "--preset", "tiny", "--clients", "0"]) == 1


def test_chat_uses_the_tokenizers_template_when_the_folder_has_one(model, tokenizer):
    from onebox.serve import Message

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    server = Server(Engine(model, max_batch=1), tokenizer, "micro", chat_template=template)
    messages = [Message(role="user", content="Who is there?")]
    assert server.render_chat(messages) == "<user>Who is there?<assistant>"
    plain = Server(server.engine, tokenizer, "micro")
    assert plain.render_chat(messages) == "User: Who is there?\nAssistant:"


def test_serve_command_starts_a_server_for_a_run_folder(tmp_path, corpus_dir):
    import os
    import subprocess
    import sys

    from conftest import micro_train

    from onebox.training import train

    train(
        micro_model(),
        micro_train(tmp_path / "run", corpus_dir, max_steps=2, eval_every=0, ckpt_every=0),
        show_progress=False,
    )
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onebox.cli",
            "serve",
            str(tmp_path / "run"),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--model-name",
            "run",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health == {"status": "ok", "model": "run"}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        done = client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": "Speak."}], max_tokens=5
        )
        assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 5
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_the_decode_model_is_a_conversion_that_falls_back_to_the_reference_off_cuda(model):
    """to_decode builds a decode model beside the plain one (the same weights and state dict; the plain
    model is left as it was): its blocks' attention and feed-forward and its root are the decode modules,
    its caches hold the attention kernel's counters; where the kernels do not apply (here: the CPU) each
    part is the reference computation, bit for bit. The kernels themselves are compared with the reference
    through Triton's interpreter (tests/test_kernels.py) and on CUDA (tests/test_gpu.py)."""
    from onebox.infer import decode, kernels
    from onebox.infer.engine import Engine
    from onebox.model import Attention

    plain = Transformer(model.config).eval()
    plain.load_state_dict(model.state_dict())
    keys = set(plain.state_dict())
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        caches = plain.new_kv_caches(2)
        before = [plain(ids[:, :11], torch.arange(11), caches), plain(ids[:, 11:], torch.tensor([[11], [11]]), caches)]
        fast = decode.to_decode(plain, "gemv,attention,rope")
        assert decode.to_decode(fast) is fast  # idempotent
        block = fast.layers[0]
        assert isinstance(fast, decode.DecodeTransformer) and fast.kernels == ["attention", "gemv", "rope"]
        assert isinstance(block.self_attn, decode.DecodeAttention) and isinstance(block.mlp, decode.DecodeFeedForward)
        assert isinstance(block.self_attn.o_proj, decode.GemvLinear) and isinstance(
            block.mlp.down_proj, decode.GemvLinear
        )
        assert type(plain.layers[0].self_attn) is Attention  # the plain model is not touched
        assert set(fast.state_dict()) == keys and fast.embed_tokens.weight is plain.embed_tokens.weight
        caches = fast.new_kv_caches(2)
        assert all(isinstance(c, decode.DecodeKVCache) and c.counts.shape == (2, model.config.heads) for c in caches)
        assert caches[0].rows(1, 2).counts.shape == (1, model.config.heads)
        after = [fast(ids[:, :11], torch.arange(11), caches), fast(ids[:, 11:], torch.tensor([[11], [11]]), caches)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    row = torch.randn(1, 1, 8, dtype=torch.bfloat16)
    assert not kernels.available(torch.device("cpu")) and not kernels.usable(
        row, torch.randn(4, 8, dtype=torch.bfloat16)
    )
    assert Engine(Transformer(model.config), max_batch=1, compile=False).kernels == []  # none on the CPU by default
    for wrong in ("gemv,flash", "gemv,norm", "swiglu", "prefetch"):  # norm/swiglu folding and prefetch are gone
        with pytest.raises(OneboxError, match="unknown decode kernels"):
            Engine(Transformer(model.config), max_batch=1, compile=False, kernels=wrong)


def test_programmatic_dependent_launch_routes_and_compile_options(model):
    """pdl and chain are dropped where no Hopper GPU is (the record says so); inductor's PDL is added to the
    decode step's compile options without losing the mode's own (CUDA graphs); the compiled step with those
    options computes what the eager one does."""
    import torch._inductor.config as inductor_config

    from onebox.infer import kernels
    from onebox.infer.engine import Engine, compile_options

    assert not kernels.pdl_available(torch.device("cpu"))
    for asked in ("gemv,pdl", "gemv,chain"):
        assert Engine(Transformer(model.config), max_batch=1, compile=False, kernels=asked).kernels == ["gemv"]
    assert compile_options("reduce-overhead", False) == {"mode": "reduce-overhead"}
    options = compile_options("reduce-overhead", True)
    if hasattr(inductor_config.triton, "enable_pdl"):
        assert options["options"]["triton.cudagraphs"] is True and options["options"]["triton.enable_pdl"] is True
    else:
        assert options == {"mode": "reduce-overhead"}
    fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 3, fullgraph=True, **options)
    x = torch.randn(64)
    torch.testing.assert_close(fn(x), torch.nn.functional.silu(x) * 3)


def test_the_transformers_baseline_is_warmed_up_at_the_length_it_is_timed_at():
    from onebox.bench.decode import HF_CACHES, hf_baseline, hf_generate_speed
    from onebox.model import build_model
    from onebox.presets import preset

    model = build_model(preset("tiny"), "cpu").eval()
    baseline = hf_baseline(model)
    calls = []
    real = baseline.generate
    baseline.generate = lambda ids, **kwargs: calls.append(dict(kwargs)) or real(ids, **kwargs)
    for cache in HF_CACHES:
        calls.clear()
        assert hf_generate_speed(baseline, model.config, 1, 8, 6, cache) > 0
        assert len(calls) >= 3 and all(
            c["max_new_tokens"] == 6 and c.get("cache_implementation") == (None if cache == "dynamic" else cache)
            for c in calls
        )


@pytest.mark.parametrize("name", ["qwen3-moe-tiny", "mixtral-8x7b"])
def test_the_transformers_decode_baseline_of_a_mixture_of_experts_takes_onebox_weights(name):
    """transformers holds experts stacked in memory (5.x) or one module per expert (4.x): either way the
    baseline built from onebox's weights computes onebox's logits (fp32, 1e-4)."""
    import dataclasses

    from onebox.bench.decode import hf_baseline
    from onebox.model import build_model
    from onebox.presets import preset

    config = dataclasses.replace(
        preset(name), vocab_size=256, dim=64, layers=2, heads=4, kv_heads=2, head_dim=16, hidden=128, expert_hidden=32
    )
    torch.manual_seed(0)
    model = build_model(config, "cpu").eval()
    baseline = hf_baseline(model)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(baseline(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
