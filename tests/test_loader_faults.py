"""Faults give a clear error naming the shard, or are skipped and counted; nothing hangs. Also S3 via moto."""
from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import s3fs
import torch

from stagewise.loaders import EngineSpec, Loader, LoaderError, ReadSpec, StageParams, hostdecode
from stagewise.pipeline.build_shards import build_shards
from tests.test_loader_support import jpeg_of, sample_ids, take, write_raw_split, write_unique_tree

PLAIN = StageParams(image_size=16, randaug_magnitude=0, mixup_alpha=0, randaug_ops=0)


@pytest.fixture()
def dataset(tmp_path):
    """24 unique-colour samples in shards of 6 (4 shards)."""
    write_unique_tree(tmp_path / "src", num_classes=2, per_class=12)
    build_shards(str(tmp_path / "src"), str(tmp_path / "ds"), samples_per_shard=6)
    return tmp_path / "ds"


def _loader(url: str, engine: EngineSpec | None = None, **reading) -> Loader:
    return Loader(url, split="train", batch_size=4, stage=PLAIN, device="cpu", seed=2, reading=ReadSpec(**reading),
                  engine=engine)


# The two CPU decoders: the host's (the default where loaders/_cropdecode.c is built), whose failures are
# caught per sample, and DALI's, whose failure invalidates the pipeline (the rebuild-and-bisect fault path).
DECODERS = {
    "host": (EngineSpec(host_decode=True), "cannot decode the JPEG (Premature end of JPEG file", 0),
    "dali": (EngineSpec(host_decode=False), "DALI's decoder fails on it", 1),
}
decoders = pytest.mark.parametrize("decoder", [pytest.param("host", marks=pytest.mark.skipif(
    not hostdecode.AVAILABLE, reason="loaders/_cropdecode.c was not built")), "dali"])


def test_missing_shard_raises_naming_it_or_is_skipped_and_counted(dataset):
    missing = dataset / "train-000001.tar"
    missing.unlink()
    with _loader(str(dataset)) as loader:
        with pytest.raises(LoaderError, match="train-000001.tar"):
            take(loader, epoch=0)
    with _loader(str(dataset), on_error="skip") as loader:
        with pytest.warns(RuntimeWarning, match="skipping"):
            batches = take(loader, epoch=0)
        assert len(batches) == len(loader) == 6  # equal batch count despite the hole: no DDP hang
        assert loader.skipped == 6 and "train-000001.tar" in loader.faults[0]
        ids = {i for images, _ in batches for i in sample_ids(images)}
        assert len(ids) == 18  # the 18 readable samples, each at least once (duplicates fill the hole)


def test_missing_index_names_the_index_file(dataset):
    (dataset / "train-000002.idx").unlink()
    with _loader(str(dataset)) as loader, pytest.raises(LoaderError, match=r"train-000002\.idx"):
        take(loader, epoch=0)


BAD_SAMPLES = {
    "nocls": ({"__key__": b"nocls", "jpg": jpeg_of(20)}, r"lacks member\(s\) \['cls'\]"),
    "nojpg": ({"__key__": b"nojpg", "cls": b"0"}, r"lacks member\(s\) \['jpg'\]"),
    "notjpeg": ({"__key__": b"notjpeg", "jpg": b"GIF89a not a jpeg", "cls": b"0"}, "jpg member is not a JPEG"),
    "badlabel": ({"__key__": b"badlabel", "jpg": jpeg_of(21), "cls": b"7"}, r"label\(s\) \[7\] outside"),
}


def _good(count: int, first: int = 0) -> list[dict[str, bytes]]:
    return [{"__key__": f"k{i:02d}".encode(), "jpg": jpeg_of(i), "cls": b"0"} for i in range(first, first + count)]


@pytest.mark.parametrize("key", sorted(BAD_SAMPLES))
def test_a_bad_sample_raises_naming_shard_and_key(tmp_path, key):
    sample, reason = BAD_SAMPLES[key]
    write_raw_split(tmp_path, "train", [_good(3) + [sample] + _good(3, first=3)], classes=("only",))
    with _loader(str(tmp_path)) as loader:
        with pytest.raises(LoaderError, match=rf"train-000000\.tar: sample '{key}': {reason}"):
            take(loader, epoch=0)


def test_bad_samples_are_skipped_counted_and_replaced_under_skip(tmp_path):
    bad = [BAD_SAMPLES[k][0] for k in sorted(BAD_SAMPLES)]
    write_raw_split(tmp_path, "train", [_good(6) + bad[:2], bad[2:] + _good(6, first=6)], classes=("only",))
    with _loader(str(tmp_path), on_error="skip") as loader:
        with pytest.warns(RuntimeWarning, match="skipping"):
            batches = take(loader, epoch=0)
        assert len(batches) == len(loader) == 16 // 4
        assert loader.skipped == 4  # 16 samples, 4 full batches: every bad sample is met once
        assert set(i for images, _ in batches for i in sample_ids(images)) <= set(range(12))
        messages = " ".join(loader.faults)
        assert all(key in messages for key in BAD_SAMPLES)


def test_each_sample_fault_message_names_shard_and_key(tmp_path):
    samples = [{"__key__": b"first", "jpg": jpeg_of(1)}]  # no cls
    samples += [{"__key__": f"k{i}".encode(), "jpg": jpeg_of(i), "cls": b"0"} for i in range(2, 6)]
    write_raw_split(tmp_path, "train", [samples], classes=("only",))
    with _loader(str(tmp_path), shuffle_buffer=0) as loader:
        with pytest.raises(LoaderError, match=r"train-000000\.tar: sample 'first': lacks member\(s\) \['cls'\]"):
            take(loader, epoch=0)


def test_s3_through_moto_gives_the_same_batches_as_local(tmp_path, s3_bucket):
    write_unique_tree(tmp_path / "src", num_classes=2, per_class=10)
    build_shards(str(tmp_path / "src"), str(tmp_path / "ds"), samples_per_shard=6)
    build_shards(str(tmp_path / "src"), f"{s3_bucket}/ds", samples_per_shard=6)
    stage = StageParams(image_size=24, randaug_magnitude=10, mixup_alpha=0.2)
    with Loader(str(tmp_path / "ds"), split="train", batch_size=4, stage=stage, device="cpu") as local, \
            Loader(f"{s3_bucket}/ds", split="train", batch_size=4, stage=stage, device="cpu") as remote:
        for (xa, ya), (xb, yb) in zip(take(local, epoch=3), take(remote, epoch=3), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


class _FlakyS3Proxy:
    """Forwards to moto, answering 500 InternalError to GETs of one shard: the first `failures` times, or always.

    (s3fs retries SlowDown itself, but not InternalError: that one reaches the loader's retry.)"""

    def __init__(self, upstream: str, failing: str, failures: int | None) -> None:
        self.upstream, self.failing, self.left = urlsplit(upstream), failing, failures
        self.served_errors = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and proxy.failing in self.path and proxy._should_fail():
                    error = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                head = self.command == "HEAD"  # keeps the object's Content-Length, sends no body
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _should_fail(self) -> bool:
        if self.left is None or self.left > 0:
            self.left = None if self.left is None else self.left - 1
            self.served_errors += 1
            return True
        return False

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def s3_dataset(tmp_path, s3_bucket, monkeypatch):
    write_unique_tree(tmp_path / "src", num_classes=2, per_class=6)
    build_shards(str(tmp_path / "src"), f"{s3_bucket}/ds", samples_per_shard=4)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: the loader's are under test
    return f"{s3_bucket}/ds"


@pytest.mark.parametrize("failures", [3, None])
def test_s3_transient_errors_are_retried_with_backoff_then_name_the_shard(s3_dataset, s3_endpoint, monkeypatch, failures):
    proxy = _FlakyS3Proxy(s3_endpoint, failing="train-000001.tar", failures=failures)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with Loader(s3_dataset, split="train", batch_size=4, stage=PLAIN, device="cpu",
                    reading=ReadSpec(retries=4, backoff=0.05)) as loader:
            start = time.monotonic()
            if failures is None:
                with pytest.raises(LoaderError, match=r"train-000001\.tar.*after 5 attempts"):
                    take(loader, epoch=0)
            else:
                assert len(take(loader, epoch=0)) == len(loader) == 3
            assert time.monotonic() - start < 60
            assert loader.retried >= (4 if failures is None else 1)
        assert proxy.served_errors >= (failures or 5)
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_that_goes_away_gives_an_error_naming_a_shard_not_a_hang(s3_dataset, monkeypatch):
    loader = Loader(s3_dataset, split="train", batch_size=4, stage=PLAIN, device="cpu",
                    reading=ReadSpec(retries=1, backoff=0.05))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        start = time.monotonic()
        with pytest.raises(LoaderError, match=r"s3://.*/ds/train-00000\d\.(tar|idx).*after 2 attempts"):
            take(loader, epoch=0)
        assert time.monotonic() - start < 60
    finally:
        loader.close()
        s3fs.S3FileSystem.clear_instance_cache()


def _bomb(sample_id: int, side: int = 30_000) -> bytes:
    """A real small JPEG whose frame header claims side x side pixels (a decompression bomb's header)."""
    data = bytearray(jpeg_of(sample_id))
    sof = data.find(b"\xff\xc0")  # baseline frame header: marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    return bytes(data)


def _truncated_scan(sample_id: int) -> bytes:
    """A JPEG cut halfway through its entropy-coded data: the headers are intact, DALI's decoder fails on it."""
    data = jpeg_of(sample_id)
    scan = data.find(b"\xff\xda")
    return data[: scan + (len(data) - scan) // 2]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture()
def bad_data(tmp_path):
    """16 samples in 2 shards of 8: one with a corrupt scan behind a valid header, one with a bomb's header."""
    write_raw_split(tmp_path, "train", [
        _good(3) + [{"__key__": b"corrupt", "jpg": _truncated_scan(3), "cls": b"0"}] + _good(4, first=4),
        _good(3, first=8) + [{"__key__": b"bomb", "jpg": _bomb(11), "cls": b"0"}] + _good(4, first=12),
    ], classes=("only",))
    return str(tmp_path)


@decoders
def test_an_oversized_header_and_a_corrupt_scan_are_skipped_counted_and_never_end_the_run(bad_data, decoder):
    engine, says, rebuilds = DECODERS[decoder]
    start, rss = time.monotonic(), _rss_mb()
    with _loader(bad_data, engine, on_error="skip") as loader:
        with pytest.warns(RuntimeWarning, match="skipping"):
            epochs = [list(loader), list(loader)]  # no set_epoch: epoch 0, then epoch 1
        assert [len(batches) for batches in epochs] == [4, 4]
        assert loader.skipped == 4  # both bad samples, in each epoch
        messages = " ".join(loader.faults)
        assert "sample 'bomb': decompression bomb: the frame header says 30000x30000" in messages
        assert f"sample 'corrupt': {says}" in messages
        assert loader._runner.rebuilt == rebuilds  # DALI's fault path ran once; epoch 1 replaced 'corrupt' up front
        for batches in epochs:
            ids = [i for images, _ in batches for i in sample_ids(images)]
            assert len(ids) == 16 and set(ids) <= set(range(16)) - {3, 11}  # the bad ones replaced by good ones
    assert time.monotonic() - start < 60
    assert _rss_mb() - rss < 300  # the bomb's header claims 2.7 GB of pixels; nothing near that was allocated


@decoders
@pytest.mark.parametrize("bad", ["corrupt", "bomb"])
def test_under_raise_the_error_names_the_one_shard_and_key_that_failed(tmp_path, bad, decoder):
    payload = _truncated_scan(3) if bad == "corrupt" else _bomb(3)
    write_raw_split(tmp_path, "train", [_good(5), _good(2, first=5) + [{"__key__": bad.encode(), "jpg": payload,
                                                                     "cls": b"0"}] + _good(2, first=7)],
                    classes=("only",))
    with _loader(str(tmp_path), DECODERS[decoder][0]) as loader, pytest.raises(LoaderError) as error:
        list(loader)
    message = str(error.value)
    shard = "train-000001.tar"
    assert f"{shard}: sample '{bad}': " in message, message
    assert message.count("sample '") == 1 and "train-000000.tar" not in message, message


def test_the_pixel_limit_means_what_build_shards_max_pixels_means(tmp_path):
    from stagewise.pipeline.imagefix import DEFAULT_MAX_PIXELS
    from stagewise.shards.jpeg import DEFAULT_MAX_PIXELS as SHARDS_DEFAULT

    assert ReadSpec().max_pixels == DEFAULT_MAX_PIXELS == SHARDS_DEFAULT  # one definition, one default
    write_raw_split(tmp_path, "train", [_good(8)], classes=("only",))  # 40 x 30 px images
    with _loader(str(tmp_path), max_pixels=40 * 30) as loader:  # refused only above the limit: these pass
        assert len(list(loader)) == 2
    with _loader(str(tmp_path), max_pixels=40 * 30 - 1) as loader, \
            pytest.raises(LoaderError, match=r"sample 'k0\d': decompression bomb: .* 40x30 = 1200 pixels, over the limit of 1199"):
        list(loader)
