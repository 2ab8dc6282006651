"""fsspec access to DEST and run folders: a local path, `file://` or `s3://bucket/prefix`; the one atomic writer.

S3 credentials and endpoint come from the standard AWS environment and config
files (`AWS_ENDPOINT_URL` for S3-compatible stores), as boto does. Objects
become visible only when complete: locally by writing a temporary name in the
same folder, fsyncing it and renaming it (a crash leaves the old file or the
new one, never half of one); on S3 through a single PUT or a completed
multipart upload. Shards, indexes, manifests, journals and checkpoints all go
through `write_atomic` / `publish_file`.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import IO

import fsspec

from stagewise.shards.layout import temp_name


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def parent_url(url: str) -> str:
    """The folder or prefix holding `url` ('.' for a bare file name)."""
    return url.rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


# botocore's exception class names (matched by name: a local-only install has no botocore to import).
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it (s3fs and aiobotocore wrap botocore's errors in their own)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def describe_error(exc: BaseException) -> str | None:
    """One line a person can act on for an S3 error (credentials, endpoint, bucket, key), or None when `exc` is
    not one. The one place where botocore's and s3fs's errors are translated; every command calls it."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    where = f"the S3 endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS S3 (no AWS_ENDPOINT_URL set)"
    for e in _chain(exc):
        name = type(e).__name__
        if name in _NO_CREDENTIALS:
            return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                    "with ~/.aws/credentials")
        if name in _UNREACHABLE:
            return f"cannot connect to {where}: check the address and that the store is running ({e})"
        response = getattr(e, "response", None)  # botocore's ClientError and its generated subclasses
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            bucket = response.get("Error", {}).get("BucketName", "")
            if code == "NoSuchBucket":
                return f"S3 bucket {bucket or ''} does not exist at {where}: create it or fix the s3:// URL"
            if code in _BAD_CREDENTIALS:
                return f"S3 refused the credentials ({code}): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE"
            if code in ("NoSuchKey", "404"):
                return f"S3 object not found ({e})"
    return None


def probe(url: str) -> str | None:
    """One cheap request to the store of `url` (a HEAD of it; of its bucket too when it is missing): None when
    the store answered and the bucket exists, else the problem in one line. Local paths need no request."""
    if is_local(url):
        return None
    try:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if not url_exists(url) and not url_exists(url.split("://", 1)[0] + "://" + bucket):
            return f"S3 bucket {bucket!r} does not exist: create it or fix the URL {url}"
    except Exception as exc:  # noqa: BLE001 - only what describe_error names is a user's problem
        message = describe_error(exc)
        if message is None:
            raise
        return message
    return None


def url_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def open_url(url: str, mode: str = "rb"):
    fs, path = _fs(url)
    return fs.open(path, mode)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(local_tmp: str, url: str) -> None:
    """Move a finished local file to `url` so that it appears complete or not at all."""
    if is_local(url):
        target = local_path(url)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        _fsync(local_tmp)  # its bytes on disk before the rename makes them the file
        os.replace(local_tmp, target)  # atomic within one file system
        return
    fs, path = _fs(url)
    fs.put_file(local_tmp, path)  # s3fs: one PUT, or multipart completed at the end
    os.unlink(local_tmp)


def write_atomic(url: str, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """`data` (bytes, or a function that writes to a binary file) at `url`, complete or not at all."""
    write = data if callable(data) else (lambda f: f.write(data))
    if not is_local(url):
        import io

        buf = io.BytesIO()
        write(buf)
        fs, path = _fs(url)
        fs.pipe_file(path, buf.getvalue())  # one PUT (or a completed multipart upload): objects appear whole
        return
    target = local_path(url)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(target), temp_name(os.path.basename(target)))  # same folder: no cross-fs rename
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_of(url: str) -> str:
    """Hex sha256 of the object at `url`, streamed in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_url(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
