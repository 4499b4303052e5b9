"""Token shards, preparation from text and the batch loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onebox.data import (
    HEADER_BYTES,
    MAGIC,
    BatchLoader,
    dataset_info,
    find_shards,
    prepare,
    read_shard,
    write_shard,
)
from onebox.errors import OneboxError
from onebox.tokenizer import load_tokenizer


def _fineweb_shard(path, tokens):
    """A shard written the way llm.c's fineweb.py writes one (independent of onebox's writer)."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_reads_llm_c_fineweb_shards(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000)
    _fineweb_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    _fineweb_shard(tmp_path / "fineweb_val_000000.bin", tokens[:1000])
    train, val = find_shards(tmp_path)
    assert [p.name for p in train] == ["fineweb_train_000001.bin"] and len(val) == 1
    assert np.array_equal(read_shard(train[0]), tokens)
    loader = BatchLoader(train, batch=2, seq_len=16, seed=0)
    x, y = loader.next_batch()
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_shard_round_trip(tmp_path, dtype):
    tokens = np.arange(70000, dtype=np.int64) % (70000 if dtype == np.uint32 else 65536)
    write_shard(tmp_path / "train_0.bin", tokens.astype(dtype))
    back = read_shard(tmp_path / "train_0.bin")
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, tokens)
    assert isinstance(back, np.memmap)


def test_truncated_shard_is_refused(tmp_path):
    path = tmp_path / "train_0.bin"
    write_shard(path, np.arange(1000, dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(OneboxError, match="truncated or corrupt"):
        read_shard(path)
    path.write_bytes(data[:100])
    with pytest.raises(OneboxError, match="truncated"):
        read_shard(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "train_0.bin"
    path.write_bytes(b"\x00" * (HEADER_BYTES + 100))
    with pytest.raises(OneboxError, match="not a token shard"):
        read_shard(path)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (MAGIC, 7, 0)
    path.write_bytes(header.tobytes())
    with pytest.raises(OneboxError, match="unknown version 7"):
        read_shard(path)


def test_prepare_holds_out_whole_documents(tmp_path):
    docs = [f"document number {i}. " + "the quick brown fox jumps over the lazy dog. " * 30 for i in range(10)]
    src = tmp_path / "src"
    src.mkdir()
    for i, text in enumerate(docs):
        (src / f"{i:02d}.txt").write_text(text)
    meta = prepare([src], tmp_path / "out", vocab_size=300, val_fraction=0.2)
    assert meta["documents"] == 10 and meta["val_documents"] == 2
    tok = load_tokenizer(tmp_path / "out")
    val_text = tok.decode(read_shard(tmp_path / "out" / "val_000000.bin").tolist())
    assert "document number 4." in val_text and "document number 9." in val_text
    assert "document number 3." not in val_text
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(d.encode()) for d in docs)


def test_prepare_jsonl_and_given_tokenizer(tmp_path, corpus_dir):
    lines = [json.dumps({"text": f"line {i}: to be or not to be"}) for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare(
        [tmp_path / "a.jsonl"], tmp_path / "out", tokenizer_path=corpus_dir / "tokenizer.json", shard_tokens=1024
    )
    assert meta["vocab_size"] == 512 and meta["documents"] == 40 and meta["val_documents"] == 2
    tok = load_tokenizer(corpus_dir)
    ids = np.concatenate([read_shard(p) for p in sorted((tmp_path / "out").glob("train_*.bin"))]).tolist()
    eos = tok.token_to_id("<|endoftext|>")
    assert ids.count(eos) == 38 and ids[0] == eos
    assert tok.decode(ids[1 : ids.index(eos, 1)]) == "line 0: to be or not to be"


def test_prepare_single_document_splits_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"verse {i} of the only poem\n" for i in range(400)))
    meta = prepare([tmp_path / "one.txt"], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    assert meta["val_tokens"] > 0 and 0.05 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.15
    tok = load_tokenizer(tmp_path / "out")
    assert "verse 399" in tok.decode(read_shard(tmp_path / "out" / "val_000000.bin").tolist())


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", "holds no text files"),
        (lambda d: _write(d / "bad.jsonl", "{not json}\n"), "not valid JSON"),
        (lambda d: _write(d / "nofield.jsonl", '{"body": "x"}\n'), "no string 'text' field"),
    ],
)
def test_prepare_bad_inputs(tmp_path, make_input, message):
    with pytest.raises(OneboxError, match=message):
        prepare([make_input(tmp_path)], tmp_path / "out", vocab_size=300)


def test_prepare_bad_tokenizer_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "tok.json").write_text("{broken")
    with pytest.raises(OneboxError, match="not a readable Hugging Face tokenizer"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer_path=tmp_path / "tok.json")


def test_loader_is_deterministic_from_seed_and_position(corpus_dir):
    info = dataset_info(corpus_dir)
    a = BatchLoader(info.train_shards, 4, 32, seed=5)
    b = BatchLoader(info.train_shards, 4, 32, seed=5)
    c = BatchLoader(info.train_shards, 4, 32, seed=6)
    first = [a.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(x, b.next_batch()[0]) for x in first)
    assert not torch.equal(first[0], c.next_batch()[0])
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    d = BatchLoader(info.train_shards, 4, 32, seed=0)
    d.load_state_dict(state)
    assert all(torch.equal(x, d.next_batch()[0]) for x in expected)


def test_loader_epochs_cover_every_window_once(tmp_path):
    write_shard(tmp_path / "train_0.bin", np.arange(33 * 10 + 1, dtype=np.uint16))
    loader = BatchLoader([tmp_path / "train_0.bin"], batch=2, seq_len=33, seed=1)
    starts = [int(row[0]) for _ in range(5) for row in loader.next_batch()[0]]
    assert sorted(starts) == [33 * i for i in range(10)]
    assert loader.next_batch()[0].shape == (2, 33) and loader.epoch == 1


def test_ranks_take_disjoint_slices(corpus_dir):
    info = dataset_info(corpus_dir)
    whole = BatchLoader(info.train_shards, 4, 32, seed=3).next_batch()[0]
    parts = [BatchLoader(info.train_shards, 2, 32, seed=3, rank=r, world=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_loader_refuses_data_smaller_than_a_batch(tmp_path):
    write_shard(tmp_path / "train_0.bin", np.arange(50, dtype=np.uint16))
    with pytest.raises(OneboxError, match="fewer than one batch"):
        BatchLoader([tmp_path / "train_0.bin"], batch=4, seq_len=32)


def test_missing_data_folder(tmp_path):
    with pytest.raises(OneboxError, match="does not exist"):
        dataset_info(tmp_path / "nothing")
    with pytest.raises(OneboxError, match="no training shards"):
        dataset_info(tmp_path)


# --- prepare never loses the data a folder held ------------------------------------------------


def _docs(folder, count=12, words=400):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        (folder / f"{i}.txt").write_text(" ".join(f"word{i} verse{j % 97}" for j in range(words)))
    return folder


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda d: _write(d / "bad.jsonl", '{"text": "fine"}\n{broken\n'), "not valid JSON"),
        (lambda d: _write(d / "empty.txt", ""), "input is empty"),
        (lambda d: _write(d / "one.txt", "x"), "split came out empty"),
    ],
)
def test_a_failed_prepare_leaves_the_earlier_data_as_it_was(tmp_path, bad, message):
    out = tmp_path / "data"
    prepare([_docs(tmp_path / "docs")], out, vocab_size=300, val_fraction=0.25)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OneboxError, match=message):
        prepare([bad(tmp_path)], out, vocab_size=300, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if not p.name.startswith(".")
    )


def test_prepare_refuses_a_data_folder_without_force_and_keeps_other_files(tmp_path):
    out = tmp_path / "data"
    prepare([_docs(tmp_path / "docs")], out, vocab_size=300, val_fraction=0.25)
    (out / "notes.md").write_text("my notes")
    with pytest.raises(OneboxError, match="already holds prepared data.*--force"):
        prepare([_docs(tmp_path / "docs")], out, vocab_size=300)
    prepare([_docs(tmp_path / "other", count=8)], out, vocab_size=280, val_fraction=0.25, force=True)
    assert (out / "notes.md").read_text() == "my notes"
    assert json.loads((out / "meta.json").read_text())["documents"] == 8


def test_prepare_refuses_binary_input_and_counts_replaced_bytes(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(OneboxError, match="does not look like text"):
        prepare([tmp_path / "blob.txt"], tmp_path / "out", vocab_size=300)
    assert not (tmp_path / "out").exists()
    docs = _docs(tmp_path / "docs")
    (docs / "0.txt").write_bytes((docs / "0.txt").read_bytes() + b" caf\xe9 \xff\xfe end")
    said = []
    prepare([docs], tmp_path / "out", vocab_size=300, val_fraction=0.25, progress=said.append)
    assert any("3 bytes that are not valid UTF-8 were replaced" in line and "0.txt" in line for line in said), said


def test_a_shard_with_a_token_outside_the_vocabulary_is_refused_when_opened(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.array([1, 2, 3, 700] + [5] * 500, dtype=np.uint16))
    with pytest.raises(OneboxError, match="token id 700, outside the model's vocabulary of 512"):
        BatchLoader([tmp_path / "train_000000.bin"], 2, 16, vocab_size=512)
    assert BatchLoader([tmp_path / "train_000000.bin"], 2, 16, vocab_size=701).windows == 31


def test_validation_on_fewer_windows_than_a_batch_is_a_partial_batch(tmp_path):
    write_shard(tmp_path / "val_000000.bin", np.arange(15 * 16 + 1, dtype=np.uint16) % 500)
    loader = BatchLoader([tmp_path / "val_000000.bin"], 16, 16, shuffle=False, partial=True)
    assert loader.partial and loader.batch == 15 and loader.next_batch()[0].shape == (15, 16)
    with pytest.raises(OneboxError, match="fewer than one batch"):
        BatchLoader([tmp_path / "val_000000.bin"], 16, 16)
    write_shard(tmp_path / "tiny.bin", np.arange(10, dtype=np.uint16))
    with pytest.raises(OneboxError, match="fewer than one a process"):
        BatchLoader([tmp_path / "tiny.bin"], 16, 16, partial=True)
