"""Conversation data: chat, instruction and preference JSONL rendered with a chat template, the loss mask
on the assistant's tokens only (checked token by token against where the template puts each turn), the
example loader's targets, bad input, and a LoRA chat fine-tune on the CPU whose held-out loss falls."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import micro_model, micro_train

from onebox.data import ExampleLoader, prepare
from onebox.data.conversations import DEFAULT_TEMPLATE
from onebox.data.examples import IGNORE, example_files
from onebox.errors import OneboxError
from onebox.tokenizer import load_tokenizer
from onebox.training import train

LLAMA3_LIKE = (  # a template of its own kind (header markers, an end-of-turn token), with a bos in front
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _conversation(rng: random.Random, i: int) -> list[dict[str, str]]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    turns = [{"role": "system", "content": "You add numbers."}] if i % 3 == 0 else []
    turns += [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"It is {a + b}."},
    ]
    if i % 2:
        turns += [
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"That makes {2 * (a + b)}."},
        ]
    return turns


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, corpus_dir):
    """A folder with the corpus's tokenizer and (in `llama`) a template of its own."""
    root = tmp_path_factory.mktemp("model")
    for name, template in (("chatml", None), ("llama", LLAMA3_LIKE)):
        (root / name).mkdir()
        (root / name / "tokenizer.json").write_text((corpus_dir / "tokenizer.json").read_text())
        if template:
            config = {"chat_template": template, "bos_token": "<s>"}
            (root / name / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("template", ["chatml", "llama"])
def test_the_mask_covers_exactly_the_assistant_turns_token_by_token(tmp_path, model_folder, template):
    rng = random.Random(0)
    conversations = [_conversation(rng, i) for i in range(30)]
    data = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    meta = prepare([data], tmp_path / "out", tokenizer_path=model_folder / template, val_fraction=0.2, fmt="chat")
    assert meta["kind"] == "chat" and meta["train_examples"] + meta["val_examples"] == 30
    tokens_path, mask_path, starts_path = example_files(tmp_path / "out", "train")
    tokens, mask, starts = np.fromfile(tokens_path, dtype=np.uint16)[512:], np.load(mask_path), np.load(starts_path)
    tokenizer = load_tokenizer(model_folder / template)
    train_conversations = [c for i, c in enumerate(conversations) if i % 5 != 4]
    assert len(starts) - 1 == len(train_conversations)
    for k, messages in enumerate(train_conversations):
        ids = tokens[starts[k] : starts[k + 1]].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        # where each assistant turn sits in the rendering, found by searching for its markers independently of the template code
        opener, closer = (
            ("<|im_start|>assistant\n", "<|im_end|>\n")
            if template == "chatml"
            else ("assistant<|end_header_id|>\n\n", "<|eot_id|>")
        )
        spans, at = [], 0
        for m in messages:
            if m["role"] == "assistant":
                begin = text.index(opener + m["content"], at) + len(opener)
                at = begin + len(m["content"]) + len(closer)
                assert text[begin:at] == m["content"] + closer
                spans.append((begin, at))
        offsets = tokenizer.encode(text, add_special_tokens=False).offsets
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids
        for (first, last), flag in zip(offsets, mask[starts[k] : starts[k + 1]]):
            inside = any(b <= first < e for b, e in spans)
            assert flag == inside, (template, k, text[first:last], spans)
        learnt = "".join(text[a:b] for (a, b), flag in zip(offsets, mask[starts[k] : starts[k + 1]]) if flag)
        assert learnt == "".join(m["content"] + closer for m in messages if m["role"] == "assistant")


def test_instruction_and_preference_records_become_conversations(tmp_path, model_folder):
    records = [{"instruction": f"Say {i}.", "input": "Please." if i % 2 else "", "output": f"{i}!"} for i in range(10)]
    meta = prepare(
        [_write_jsonl(tmp_path / "i.jsonl", records)],
        tmp_path / "inst",
        tokenizer_path=model_folder / "chatml",
        val_fraction=0.2,
        fmt="instruction",
    )
    assert (meta["train_examples"], meta["val_examples"]) == (8, 2) and meta["train_loss_tokens"] > 0
    pairs = [{"prompt": f"Pick {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(10)]
    meta = prepare(
        [_write_jsonl(tmp_path / "p.jsonl", pairs)],
        tmp_path / "pref",
        tokenizer_path=model_folder / "chatml",
        val_fraction=0.2,
        fmt="preference",
    )
    assert (meta["kind"], meta["train_examples"], meta["val_examples"]) == (
        "preference",
        16,
        4,
    )  # chosen, rejected: a pair together
    with pytest.raises(OneboxError, match="preference pairs"):
        train(micro_model(), micro_train(tmp_path / "run", tmp_path / "pref"), show_progress=False)


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', "needs a role"),
        ('{"messages": "hi"}', "non-empty list of messages"),
        ("[1, 2]", "not an object"),
    ],
)
def test_bad_conversations_are_refused_with_the_line(tmp_path, model_folder, line, match):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data = tmp_path / "bad.jsonl"
    data.write_text(good + "\n" + line + "\n")
    with pytest.raises(OneboxError, match=match):
        prepare([data], tmp_path / "out", tokenizer_path=model_folder / "chatml", fmt="chat")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(OneboxError, match="--tokenizer"):
        prepare([data], tmp_path / "out2", fmt="chat")


def test_the_loader_gives_whole_examples_with_targets_only_on_assistant_tokens(tmp_path, model_folder):
    rng = random.Random(1)
    data = _write_jsonl(tmp_path / "c.jsonl", [{"messages": _conversation(rng, i)} for i in range(20)])
    prepare([data], tmp_path / "out", tokenizer_path=model_folder / "chatml", val_fraction=0.2, fmt="chat")
    files = example_files(tmp_path / "out", "train")
    loader = ExampleLoader(files, batch=4, seq_len=48, seed=3, pad_id=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 48)
    for row in range(4):
        start, stop = loader.spans[int(loader._order[row])]
        ids, mask = loader.tokens[start:stop].astype(np.int64), loader.mask[start:stop]
        n = len(ids) - 1
        assert torch.equal(x[row, :n], torch.from_numpy(ids[:-1])) and (x[row, n:] == 0).all()
        want = np.where(mask[1:] > 0, ids[1:], IGNORE)
        assert torch.equal(y[row, :n], torch.from_numpy(want)) and (y[row, n:] == IGNORE).all()
        assert (y[row] != IGNORE).any()
    again = ExampleLoader(files, batch=4, seq_len=48, seed=3)
    again.load_state_dict(loader.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), again.next_batch()))


def test_a_lora_chat_fine_tune_on_the_cpu_lowers_the_held_out_loss(tmp_path, corpus_dir, model_folder):
    """A base trained briefly on the corpus, then LoRA on 200 conversations: the held-out assistant-token loss
    (onebox eval on the conversation data) falls."""
    from onebox.training.evaluation import evaluate_model

    rng = random.Random(2)
    data = _write_jsonl(tmp_path / "c.jsonl", [{"messages": _conversation(rng, i)} for i in range(200)])
    prepare([data], tmp_path / "chat", tokenizer_path=model_folder / "chatml", val_fraction=0.1, fmt="chat")
    train(micro_model(), micro_train(tmp_path / "base", corpus_dir, max_steps=20, eval_every=0), show_progress=False)
    before = evaluate_model(tmp_path / "base", tmp_path / "chat", torch.device("cpu"), batch=4, say=lambda m: None)
    lora = dict(init_from=str(tmp_path / "base"), lora_rank=8, lora_alpha=16.0, lr=1e-2, eval_every=0)
    train(
        micro_model(),
        micro_train(tmp_path / "lora", tmp_path / "chat", max_steps=150, ckpt_every=150, **lora),
        show_progress=False,
    )
    after = evaluate_model(tmp_path / "lora", tmp_path / "chat", torch.device("cpu"), batch=4, say=lambda m: None)
    assert after["loss"] < 0.8 * before["loss"], (before, after)  # 5.94 -> 4.40 when written


def test_the_default_template_is_chatml():
    assert "<|im_start|>" in DEFAULT_TEMPLATE and "add_generation_prompt" in DEFAULT_TEMPLATE


def test_prepare_format_chat_from_the_command_line(tmp_path, model_folder, capsys):
    from onebox.cli import main

    rng = random.Random(3)
    data = _write_jsonl(tmp_path / "c.jsonl", [{"messages": _conversation(rng, i)} for i in range(10)])
    argv = ["prepare", str(data), "--out", str(tmp_path / "out"), "--format", "chat"]
    assert main([*argv, "--tokenizer", str(model_folder / "llama")]) == 0
    assert "training and" in capsys.readouterr().out and (tmp_path / "out" / "train_mask.npy").is_file()
    assert main([*argv[:3], str(tmp_path / "other"), *argv[4:]]) != 0  # no tokenizer: a clear error, no traceback
    assert "--tokenizer" in capsys.readouterr().err
