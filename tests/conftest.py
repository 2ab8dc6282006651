"""Shared test fixtures: a real S3 server (moto) on loopback, small image trees and their shards,
and a temporary environment."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from PIL import Image

# Solid colours, one per class, far apart so that decoding, cropping, mixing
# and JPEG loss never make one class look like another.
PALETTE = [
    (230, 25, 25), (25, 230, 25), (25, 25, 230), (230, 230, 25), (230, 25, 230),
    (25, 230, 230), (240, 240, 240), (15, 15, 15), (128, 64, 0), (0, 128, 255),
]


def write_solid_tree(root: Path, num_classes: int = 4, per_class: int = 6, size: tuple[int, int] = (96, 72)) -> Path:
    """`root/class_k/img_i.jpg`, each image a solid colour that encodes its class."""
    for c in range(num_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, PALETTE[c % len(PALETTE)]).save(folder / f"img_{i}.jpg", quality=95)
    return root


def build_tree_shards(root: Path, write_tree: Callable[[Path], Path], samples_per_shard: int) -> str:
    """`write_tree(root / "src")`, then the real shard builder's train split of it in `root / "ds"`; returns that."""
    from stagewise.pipeline.build_shards import build_shards  # imported here: most tests that load conftest need no shards

    write_tree(root / "src")
    build_shards(str(root / "src"), str(root / "ds"), samples_per_shard=samples_per_shard)
    return str(root / "ds")


@contextlib.contextmanager
def patched_env(values: Mapping[str, str]) -> Iterator[None]:
    """Environment variables set for the block; afterwards each has its old value again, or is unset.

    For session- and module-scoped fixtures, which cannot use the function-scoped `monkeypatch`.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


_MOTO_SERVER = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 server (moto's ThreadedMotoServer) on 127.0.0.1, with the AWS
    environment pointing at it.

    It runs in a child process: DALI's S3 client blocks while holding the GIL,
    so a server thread in the test process would starve and time out.
    """
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _MOTO_SERVER, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "moto server did not start"
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with patched_env(aws):
            yield endpoint
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields its `s3://name` URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()
