"""The shard contract shared by the builder (`pipeline/`) and the loader (`loaders/`).

This package is the only code that knows how a dataset is laid out: file names
of shards and index files, the members of a sample, the manifest, and the
checksums. Everything else goes through these names:

    from stagewise.shards import Sample, ShardWriter, read_manifest, open_split, iter_samples
"""
from stagewise.shards.layout import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    index_name,
    journal_name,
    rejects_name,
    shard_name,
)
from stagewise.shards.manifest import FORMAT, Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
from stagewise.shards.dataset import SplitView, iter_meta, iter_samples, iter_tar_members, open_split, read_index
from stagewise.shards.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    MEMBERS,
    Sample,
    SampleError,
    decode_label,
    decode_meta,
    make_key,
    sample_from_members,
    targets_from_meta,
)
from stagewise.shards.store import join_url, open_url, publish_bytes, publish_file, url_exists
from stagewise.shards.writer import ShardWriter, build_index

__all__ = [
    "FORMAT", "IMAGE_EXT", "INDEX_SUFFIX", "LABEL_EXT", "MANIFEST_NAME", "MEMBERS", "META_EXT",
    "SHARD_SUFFIX", "Manifest", "Sample", "SampleError", "ShardInfo", "ShardWriter", "SplitInfo",
    "SplitView", "build_index", "decode_label", "decode_meta", "index_name", "iter_samples",
    "iter_meta", "iter_tar_members", "join_url", "journal_name", "make_key", "open_split", "open_url",
    "publish_bytes", "publish_file", "read_index", "read_manifest", "rejects_name",
    "sample_from_members", "shard_name", "targets_from_meta", "url_exists", "write_manifest",
]
