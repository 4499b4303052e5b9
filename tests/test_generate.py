"""Generation: the KV-cache path against the no-cache path, and the samplers."""

from __future__ import annotations

import pytest
import torch
from conftest import micro_model

from onebox.errors import OneboxError
from onebox.infer.generate import generate
from onebox.infer.sampling import sample_next
from onebox.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(micro_model(seq_len=96, tie_embeddings=False)).eval()
    with torch.no_grad():  # sharper logits, so greedy paths branch and differences would show
        m.lm_head.weight.mul_(20)
    return m


@pytest.mark.parametrize("prompt_len", [1, 7, 30])
def test_cached_greedy_equals_uncached_greedy(model, prompt_len):
    prompt = torch.randint(0, 512, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    cached = generate(model, prompt, 40, temperature=0, use_cache=True)
    plain = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert cached.samples == plain.samples and len(cached.samples[0]) == 40
    assert len(set(cached.samples[0])) > 3  # not a degenerate repeat of one token


def test_cached_logits_match_the_full_forward(model):
    idx = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        full = model(idx)
        caches = model.new_kv_caches(1, 32)
        step_logits = [model(idx[:, :12], torch.arange(12), caches)]
        for pos in range(12, 20):
            step_logits.append(model(idx[:, pos : pos + 1], torch.tensor([pos]), caches))
    assert torch.allclose(torch.cat(step_logits, dim=1), full, atol=1e-4)


def test_samples_share_one_prefill_and_follow_the_seed(model):
    prompt = [1, 2, 3]
    a = generate(model, prompt, 20, temperature=1.0, seed=7, samples=3)
    b = generate(model, prompt, 20, temperature=1.0, seed=7, samples=3)
    assert a.samples == b.samples and len(a.samples) == 3
    assert len({tuple(s) for s in a.samples}) > 1


def test_generation_stops_at_any_of_its_stop_tokens_and_streams_them(model):
    greedy = generate(model, [5, 6], 30, temperature=0).samples[0]
    first, later = greedy[4], greedy[9]
    streamed = []
    out = generate(model, [5, 6], 30, temperature=0, stop_ids=(later, first), on_token=streamed.append)
    end = min(greedy.index(first), greedy.index(later))
    assert out.samples[0] == greedy[:end] and out.finish_reasons == ["stop"]
    assert streamed == greedy[:end]  # every kept token, as it came (the stop token itself is not given)


def test_max_new_tokens_is_clamped_to_the_context(model):
    out = generate(model, list(range(90)), 50, temperature=0)
    assert len(out.samples[0]) == 6 and out.finish_reasons == ["length"]


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([], {}, "prompt is empty"),
        ([600], {}, r"must lie in \[0, 512\)"),
        (list(range(96)), {}, "context is 96"),
        ([1], {"samples": 0}, "at least 1"),
    ],
)
def test_bad_generation_requests(model, prompt, kwargs, message):
    with pytest.raises(OneboxError, match=message):
        generate(model, prompt, 5, **kwargs)


def test_text_prompt_needs_a_tokenizer():
    from onebox.infer.framing import onebox_framing

    with pytest.raises(OneboxError, match="no tokenizer"):
        onebox_framing(None).encode("hello")


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = torch.softmax(logits[0], 0)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0}
    assert sample_next(logits[:1], 0.0).tolist() == [0]


def test_generate_and_the_engine_refuse_a_bad_request_with_the_same_check(model):
    """One check (infer.requests) for generate, the engine and the server: the same prompt is refused the
    same way by each caller; within the context, max_tokens is cut (generate, engine) or refused (strict: the API)."""
    from onebox.infer.engine import Engine, Request
    from onebox.infer.requests import InvalidRequest, check_prompt

    engine = Engine(model, max_batch=1, compile=False)
    context, vocab = model.config.seq_len, model.config.vocab_size
    for prompt, needle in (([], "prompt is empty"), ([vocab], "must lie in"), ([1] * context, "context is 96 tokens")):
        with pytest.raises(InvalidRequest, match=needle):
            generate(model, prompt, 4)
        with pytest.raises(InvalidRequest, match=needle):
            engine.submit(Request(prompt, 4))
    with pytest.raises(InvalidRequest, match="temperature"):
        engine.submit(Request([1, 2], 4, temperature=9.0))
    assert not engine.pending  # nothing queued by a refused request
    assert check_prompt([1] * 90, vocab, context, 50) == 6 and check_prompt([1] * 90, vocab, context) == 6
    with pytest.raises(InvalidRequest, match="exceed this model's context") as refused:
        check_prompt([1] * 90, vocab, context, 50, strict=True)
    assert refused.value.param == "max_tokens" and refused.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        check_prompt([0], vocab, context, leading=1)  # only the end-of-text token put before a text prompt
