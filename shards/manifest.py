"""`manifest.json`: the splits of a dataset, their classes and their shards with checksums."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from stagewise.shards.layout import MANIFEST_NAME
from stagewise.shards.store import join_url, open_url, write_atomic, url_exists

FORMAT = "stagewise-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # e.g. train-000000.tar, relative to DEST
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    classes: tuple[str, ...]  # label order: synset ids or folder names
    shards: tuple[ShardInfo, ...]
    class_counts: tuple[int, ...] = ()  # samples per label, for verify-shards
    multi_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Manifest:
    layout: str
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    format: str = FORMAT

    def with_split(self, name: str, split: SplitInfo, layout: str) -> "Manifest":
        """A copy with `name` added or replaced; other splits are kept."""
        if self.splits and layout != self.layout:
            raise ValueError(f"DEST already holds a {self.layout!r} dataset; cannot add a {layout!r} split")
        return Manifest(layout=layout, splits={**self.splits, name: split}, format=self.format)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in manifest (has {sorted(self.splits)})")
        return self.splits[name]

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "layout": self.layout,
            "splits": {
                name: {
                    "num_samples": s.num_samples,
                    "classes": list(s.classes),
                    "class_counts": list(s.class_counts),
                    "multi_label": s.multi_label,
                    "shards": [asdict(x) for x in s.shards],
                }
                for name, s in sorted(self.splits.items())
            },
        }
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
            splits = {
                name: SplitInfo(
                    num_samples=int(s["num_samples"]),
                    classes=tuple(s["classes"]),
                    shards=tuple(ShardInfo(**x) for x in s["shards"]),
                    class_counts=tuple(s.get("class_counts", ())),
                    multi_label=bool(s.get("multi_label", False)),
                )
                for name, s in body["splits"].items()
            }
            return cls(layout=body["layout"], splits=splits, format=body["format"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a valid stagewise manifest: {exc}") from exc


def read_manifest(dest: str) -> Manifest:
    url = join_url(dest, MANIFEST_NAME)
    if not url_exists(url):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {dest} (build shards there first)")
    with open_url(url, "rb") as f:
        return Manifest.from_json(f.read().decode("utf-8"), where=url)


def read_manifest_or_none(dest: str) -> Manifest | None:
    url = join_url(dest, MANIFEST_NAME)
    return read_manifest(dest) if url_exists(url) else None


def write_manifest(dest: str, manifest: Manifest) -> None:
    """Written last, atomically, after every shard and index it names."""
    write_atomic(join_url(dest, MANIFEST_NAME), manifest.to_json().encode("utf-8"))
