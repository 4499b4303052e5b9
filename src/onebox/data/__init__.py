"""Data: token shards and the batch loader (shards), and preparing them from text (prepare)."""

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
    "dataset_info",
    "default_data_dir",
    "find_shards",
    "prepare",
    "prepare_default_corpus",
    "prepared_files",
    "read_shard",
    "write_shard",
]
