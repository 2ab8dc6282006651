"""File names inside one dataset folder or prefix (DEST)."""
from __future__ import annotations

import re
import uuid

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"  # DALI wds2idx format, one beside each shard
JOURNAL_DIR = "_journal"  # per-shard completion records, for resumable builds


TEMP_MARK = ".tmp-"  # a file being written: `<name>.tmp-<hex>` or `.<name>.tmp-<hex>`; never part of a dataset


def temp_name(name: str, hidden: bool = False) -> str:
    """A unique temporary name for writing `name` in the same folder (`hidden`: a leading dot)."""
    return f"{'.' if hidden else ''}{name}{TEMP_MARK}{uuid.uuid4().hex}"


def is_split_temp(name: str, split: str) -> bool:
    """A hidden temporary file of one of `split`'s shards (left behind by a killed build)."""
    return name.startswith(f".{split}-") and TEMP_MARK in name


def shard_name(split: str, index: int) -> str:
    """`train-000000.tar`."""
    return f"{split}-{index:06d}{SHARD_SUFFIX}"


_SHARD_FILE = re.compile(rf"^(?P<split>.+)-(?P<index>\d{{6}})"
                         rf"(?P<suffix>{re.escape(SHARD_SUFFIX)}|{re.escape(INDEX_SUFFIX)})$")


def parse_shard_name(name: str) -> tuple[str, int, str] | None:
    """(split, index, suffix) of `train-000003.tar` or `train-000003.idx`; None for any other name."""
    m = _SHARD_FILE.match(name)
    return (m["split"], int(m["index"]), m["suffix"]) if m else None


def index_name(shard: str) -> str:
    """`train-000000.idx` for `train-000000.tar`."""
    if not shard.endswith(SHARD_SUFFIX):
        raise ValueError(f"not a shard name: {shard!r}")
    return shard[: -len(SHARD_SUFFIX)] + INDEX_SUFFIX


def rejects_name(split: str) -> str:
    """`train-rejects.jsonl`: one `{"source", "reason"}` line per input not written."""
    return f"{split}-rejects.jsonl"


def journal_name(shard: str) -> str:
    """Completion record of one shard, written after the shard and its index."""
    return f"{JOURNAL_DIR}/{shard}.json"
