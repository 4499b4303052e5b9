"""The completions endpoint's logprobs and echo: each token's log-probability equals the log-softmax of
onebox's logits given the tokens before it; a prompt is scored alone with max_tokens 0 and echo (how
lm-evaluation-harness asks for log-likelihoods)."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import running_app

from onebox.infer.engine import Engine
from onebox.serve import Server, create_app

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def served(serving_model, corpus_tokenizer):
    engine = Engine(serving_model, max_batch=2).start()
    with running_app(create_app(Server(engine, corpus_tokenizer, "micro"))) as url:
        yield url, serving_model
    engine.stop()


def _logp(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def test_a_prompt_scored_alone_gives_the_log_softmax_of_the_logits(served):
    url, model = served
    ids = [5, 6, 7, 8, 9]
    body = {"model": "micro", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    lp = reply["choices"][0]["logprobs"]
    logp = _logp(model, ids)
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    for p in range(1, len(ids)):
        assert abs(lp["token_logprobs"][p] - logp[p - 1, ids[p]].item()) < 1e-4
        top = sorted(lp["top_logprobs"][p].values(), reverse=True)
        assert len(top) == 3 and abs(top[0] - logp[p - 1].max().item()) < 1e-4
    assert lp["text_offset"][0] == 0 and reply["usage"]["completion_tokens"] == 0


def test_logprobs_of_a_completion_and_echo(served):
    url, model = served
    prompt = [11, 12, 13]
    body = {"model": "micro", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == reply["choices"][0]["text"]
    echoed = httpx.post(f"{url}/v1/completions", json={**body, "echo": True}, timeout=60).json()["choices"][0]
    assert len(echoed["logprobs"]["tokens"]) == 9 and echoed["logprobs"]["token_logprobs"][3:] == lp["token_logprobs"]
    top1 = httpx.post(f"{url}/v1/completions", json={**body, "logprobs": 1}, timeout=60).json()["choices"][0]
    for value, top in zip(top1["logprobs"]["token_logprobs"], top1["logprobs"]["top_logprobs"]):
        assert abs(value - max(top.values())) < 1e-4  # greedy: each token is its position's likeliest


def test_logprobs_are_refused_when_streamed_and_bounded(served):
    url, _ = served
    body = {"model": "micro", "prompt": [1, 2], "max_tokens": 2, "logprobs": 1, "stream": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 400
    assert (
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "logprobs": 99}, timeout=60).status_code
        == 400
    )
