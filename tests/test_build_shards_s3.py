"""build-shards to a real S3 protocol server (moto on 127.0.0.1), read back by webdataset and DALI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as cli
from stagewise.shards import iter_samples, open_split, open_url
from tests.quirks import BOMB_LIMIT, write_quirk_tree

WNIDS = [f"n{1440764 + 37 * k:08d}" for k in range(10)]


@pytest.fixture(scope="module")
def imagenet_1000(tmp_path_factory):
    """1,000 inputs in ImageNet's train/<wnid>/ shape: 10 synsets x 100, every 10th a quirk, plus one unreadable."""
    root = tmp_path_factory.mktemp("imagenet")
    expected = write_quirk_tree(root / "train", WNIDS, per_class=100, quirk_every=10)
    return root, {f"train/{k}": v for k, v in expected.items()}


def test_imagenet_tree_to_s3_accounts_for_every_file(imagenet_1000, s3_bucket, capsys):
    src, expected = imagenet_1000
    dest = f"{s3_bucket}/imagenet"
    assert cli(["build-shards", str(src), dest, "--layout", "imagenet", "--split", "train",
                "--samples-per-shard", "128", "--workers", "2", "--max-pixels", str(BOMB_LIMIT), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "check: inputs 1,001 = written" in printed and "OK" in printed

    view = open_split(dest, "train")
    assert view.shard_urls[0].startswith("s3://") and view.classes == tuple(WNIDS)
    written = {s.source: s for url in view.shard_urls for s in iter_samples(url)}
    with open_url(f"{dest}/train-rejects.jsonl", "rb") as f:
        rejects = {r["source"]: r["reason"] for r in map(json.loads, f.read().decode().splitlines())}
    assert len(written) + len(rejects) == len(expected) == 1001
    assert set(written) | set(rejects) == set(expected)
    for source, exp in expected.items():
        if exp.reject:
            assert rejects[source].split(":")[0] == exp.reject
        else:
            assert WNIDS[written[source].label] == source.split("/")[1]

    # read back from the bucket with plain webdataset, through an fsspec opener
    import importlib

    import webdataset as wds

    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: open_url(url, mode)
    got = list(wds.WebDataset(view.shard_urls, shardshuffle=False).to_tuple("__key__", "cls"))
    assert len(got) == len(written)
    assert Counter(int(c) for _, c in got) == Counter(s.label for s in written.values())

    # ...and with DALI's reader, which talks S3 itself (AWS_ENDPOINT_URL) and seeks with the index files
    from nvidia.dali import fn, pipeline_def

    index_dir = src / "idx"
    index_dir.mkdir(exist_ok=True)
    local_idx = []
    for i, url in enumerate(view.index_urls):  # DALI reads index files from the local file system
        with open_url(url, "rb") as f:
            (index_dir / f"{i}.idx").write_bytes(f.read())
        local_idx.append(str(index_dir / f"{i}.idx"))

    @pipeline_def(batch_size=64, num_threads=2, device_id=None)
    def pipe_idx():
        jpg, cls = fn.readers.webdataset(paths=view.shard_urls, index_paths=local_idx, ext=["jpg", "cls"], name="r")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe_idx()
    p.build()
    assert p.reader_meta("r")["epoch_size"] == len(written)
    images, cls = p.run()
    assert len(images) == 64 and all(np.asarray(images[i]).shape[2] == 3 for i in range(64))
    assert all(0 <= int(bytes(np.asarray(cls[i])).decode()) < 10 for i in range(64))


def test_verify_catches_a_shard_corrupted_in_the_bucket(s3_bucket, tmp_path, capsys):
    from stagewise.benchmarks.datasets import write_photo_tree

    write_photo_tree(tmp_path / "src", num_classes=2, per_class=6)
    dest = f"{s3_bucket}/ds"
    build_shards(str(tmp_path / "src"), dest, samples_per_shard=4)
    assert cli(["verify-shards", dest, "--workers", "1"]) == 0
    capsys.readouterr()
    url = f"{dest}/train-000002.tar"
    with open_url(url, "rb") as f:
        data = bytearray(f.read())
    data[600] ^= 0x55
    with open_url(url, "wb") as f:
        f.write(bytes(data))
    assert cli(["verify-shards", dest, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "BAD train-000002.tar" in out and "BAD train-000000.tar" not in out
