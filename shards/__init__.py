"""The shard contract shared by the builder (`stagewise.pipeline`) and the loader (`stagewise.loaders`).

This package is the only code that knows how a dataset is laid out: file names
of shards and index files (`layout`), the members of a sample (`schema`), the
tar headers and member grouping (`tar`), the index format (`index`), the
manifest, the JPEG frame header (`jpeg`), checksums (`check`), and the one
URL and atomic-write helper (`store`). Everything else goes through these names:

    from stagewise.shards import Sample, ShardWriter, read_manifest, open_split, iter_samples
"""
from stagewise.shards.dataset import SplitView, iter_meta, iter_samples, open_split, read_index
from stagewise.shards.index import build_index, parse_index
from stagewise.shards.jpeg import FrameHeader, JpegHeaderError, read_frame_header
from stagewise.shards.layout import (
    INDEX_SUFFIX,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    index_name,
    journal_name,
    parse_shard_name,
    rejects_name,
    shard_name,
)
from stagewise.shards.manifest import FORMAT, Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest
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
from stagewise.shards.store import join_url, open_url, publish_file, url_exists, write_atomic
from stagewise.shards.writer import ShardWriter

__all__ = [
    "FORMAT", "IMAGE_EXT", "INDEX_SUFFIX", "LABEL_EXT", "MANIFEST_NAME", "MEMBERS", "META_EXT",
    "SHARD_SUFFIX", "FrameHeader", "JpegHeaderError", "Manifest", "Sample", "SampleError", "ShardInfo",
    "ShardWriter", "SplitInfo", "SplitView", "build_index", "decode_label", "decode_meta", "index_name",
    "iter_meta", "iter_samples", "join_url", "journal_name", "make_key", "open_split", "open_url",
    "parse_index", "parse_shard_name", "publish_file", "read_frame_header", "read_index", "read_manifest",
    "rejects_name", "sample_from_members", "shard_name", "targets_from_meta", "url_exists", "write_atomic",
    "write_manifest",
]
