"""The one reader and writer of index files: DALI's `wds2idx` format, one `.idx` beside each shard.

    v1.2 <samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   one line per sample

Offsets are bytes from the start of the tar, past each member's 512-byte
header. `fn.readers.webdataset(index_paths=...)` and our own streamer both
locate a sample's members through it, with ranged reads.
"""
from __future__ import annotations

INDEX_VERSION = "v1.2"  # the version DALI's wds2idx writes

Member = tuple[str, int, int, str]  # (extension, data offset, size, member name)


def build_index(entries: list[list[Member]]) -> str:
    """Index text for the samples `entries` (per sample, its members in tar order)."""
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for members in entries:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def parse_index(text: str, url: str) -> list[dict[str, tuple[int, int, str]]]:
    """Index text -> per sample {ext: (offset, size, member name)}; ValueError naming `url` and the line."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1") or not head[1].isdigit():
        raise ValueError(f"{url}: not a DALI wds2idx index (first line {lines[0] if lines else ''!r})")
    samples = []
    for n, line in enumerate(lines[1 : 1 + int(head[1])], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"{url}: line {n} is not (ext offset size name) groups")
        try:
            samples.append({parts[i]: (int(parts[i + 1]), int(parts[i + 2]), parts[i + 3])
                            for i in range(0, len(parts), 4)})
        except ValueError:
            raise ValueError(f"{url}: line {n} has an offset or size that is not a number") from None
    if len(samples) != int(head[1]):
        raise ValueError(f"{url}: header promises {head[1]} samples, found {len(samples)}")
    return samples
