"""One sample: its members inside a shard and how they are encoded.

| member | content                                                             |
|--------|---------------------------------------------------------------------|
| key    | unique in the dataset, stable across rebuilds (hash of the source)  |
| jpg    | a baseline RGB JPEG                                                 |
| cls    | the label as ASCII decimal                                          |
| json   | {"label", "labels"?, "class", "source", "width", "height"}          |
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
META_EXT = "json"
MEMBERS = (IMAGE_EXT, LABEL_EXT, META_EXT)  # order inside the tar


class SampleError(ValueError):
    """A sample in a shard lacks a member or carries a malformed one."""


def make_key(source: str) -> str:
    """Key of the sample built from `source` (its path relative to SRC).

    A hash, because sources may contain dots (webdataset splits keys at the
    first dot) and the same file name may appear under several classes. It
    depends only on the source path, so rebuilds give the same keys.
    """
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    label: int
    class_name: str
    source: str
    width: int
    height: int
    labels: tuple[int, ...] | None = None  # multi-label datasets only (ImageNet-21k)

    def meta(self) -> dict:
        meta: dict = {"label": self.label}
        if self.labels is not None:
            meta["labels"] = list(self.labels)
        meta.update({"class": self.class_name, "source": self.source, "width": self.width, "height": self.height})
        return meta

    def members(self) -> list[tuple[str, bytes]]:
        """(extension, payload) in tar order."""
        return [
            (IMAGE_EXT, self.jpg),
            (LABEL_EXT, str(self.label).encode("ascii")),
            (META_EXT, json.dumps(self.meta(), sort_keys=True, separators=(",", ":")).encode("utf-8")),
        ]


def decode_label(payload: bytes) -> int:
    try:
        return int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleError(f"cls member is not an ASCII integer: {payload[:20]!r}") from exc


def decode_meta(payload: bytes) -> dict:
    try:
        meta = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SampleError(f"json member is not JSON: {payload[:40]!r}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("label"), int):
        raise SampleError(f"json member lacks an integer 'label': {payload[:80]!r}")
    return meta


def targets_from_meta(meta: dict) -> list[int]:
    """All labels of a sample: `labels` when present (multi-label), else `[label]`."""
    labels = meta.get("labels")
    return list(labels) if labels else [meta["label"]]


def sample_from_members(key: str, members: dict[str, bytes]) -> Sample:
    """Rebuild a Sample from a shard's members; SampleError names what is wrong."""
    missing = [ext for ext in MEMBERS if ext not in members]
    if missing:
        raise SampleError(f"sample {key!r} lacks member(s) {missing}")
    label = decode_label(members[LABEL_EXT])
    meta = decode_meta(members[META_EXT])
    if meta["label"] != label:
        raise SampleError(f"sample {key!r}: cls {label} disagrees with json label {meta['label']}")
    labels = meta.get("labels")
    return Sample(
        key=key,
        jpg=members[IMAGE_EXT],
        label=label,
        class_name=str(meta.get("class", "")),
        source=str(meta.get("source", "")),
        width=int(meta.get("width", 0)),
        height=int(meta.get("height", 0)),
        labels=tuple(labels) if labels else None,
    )
