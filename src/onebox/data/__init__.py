"""Data: token shards and the batch loader (shards), whole masked examples (examples), and preparing them
from text (prepare) or from JSONL conversations (conversations)."""

from onebox.data.examples import ExampleLoader, make_loader
from onebox.data.prepare import default_data_dir, prepare, prepare_default_corpus, prepared_files
from onebox.data.shards import (
    HEADER_BYTES,
    MAGIC,
    BatchLoader,
    DatasetInfo,
    dataset_info,
    find_shards,
    read_shard,
    write_shard,
)

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "BatchLoader",
    "DatasetInfo",
    "ExampleLoader",
    "dataset_info",
    "default_data_dir",
    "find_shards",
    "make_loader",
    "prepare",
    "prepare_default_corpus",
    "prepared_files",
    "read_shard",
    "write_shard",
]
