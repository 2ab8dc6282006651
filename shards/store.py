"""fsspec access to DEST: a local path, `file://` or `s3://bucket/prefix`.

S3 credentials and endpoint come from the standard AWS environment and config
files (`AWS_ENDPOINT_URL` for S3-compatible stores), as boto does. Objects
become visible only when complete: locally by writing a temporary name and
renaming; on S3 through a single PUT or a completed multipart upload.
"""
from __future__ import annotations

import os
import uuid

import fsspec


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def url_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def open_url(url: str, mode: str = "rb"):
    fs, path = _fs(url)
    return fs.open(path, mode)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def publish_file(local_tmp: str, url: str) -> None:
    """Move a finished local file to `url` so that it appears complete or not at all."""
    if is_local(url):
        target = local_path(url)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        os.replace(local_tmp, target)  # atomic within one file system
        return
    fs, path = _fs(url)
    fs.put_file(local_tmp, path)  # s3fs: one PUT, or multipart completed at the end
    os.unlink(local_tmp)


def publish_bytes(url: str, data: bytes) -> None:
    if is_local(url):
        target = local_path(url)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return
    fs, path = _fs(url)
    fs.pipe_file(path, data)


def remove_url(url: str) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path)


def list_names(url: str) -> list[str]:
    """Base names of the objects directly under `url` ([] if it does not exist)."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
