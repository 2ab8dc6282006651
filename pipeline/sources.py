"""Finding the inputs of a build: which files, which class, which label.

Layouts:
- `folder`: `SRC/<class>/**/<file>`, any class-per-folder tree (CIFAR, Flowers, Cars exported as folders).
- `imagenet`: `SRC/train/<wnid>/*.JPEG`; `SRC/val/` as synset folders, or flat
  `ILSVRC2012_val_XXXXXXXX.JPEG` files labelled by `--val-labels` (Kaggle's
  LOC_val_solution.csv, or the devkit's ground truth plus `--val-synsets`).

Every regular, non-hidden file under a class folder is an input. Files that
cannot be given a label are returned as rejects, so that nothing is lost.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class InputFile:
    source: str  # path relative to SRC, "/"-separated: the sample's stable identity
    path: str  # absolute path to read (for a member of a tar: the tar)
    label: int
    class_name: str
    size: int  # bytes on disk, for shard sizing
    offset: int = -1  # >= 0: the input is `size` bytes at this offset inside `path` (a tar member read in place)
    labels: tuple[int, ...] | None = None  # multi-label samples (ImageNet-21k duplicates merged); label is labels[0]

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Scan:
    classes: tuple[str, ...]
    inputs: list[InputFile]
    rejects: list[tuple[str, str]]  # (source, reason)
    duplicates: int = 0  # files folded into another input with the same bytes (imagenet21k multi-label merge)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _files_under(root: str) -> list[str]:
    """Regular, non-hidden files below `root`, sorted, hidden folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if _visible(name) and os.path.isfile(full):
                found.append(full)
    return found


def _rel(src: str, path: str) -> str:
    return os.path.relpath(path, src).replace(os.sep, "/")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def class_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    return sorted(d for d in os.listdir(root) if _visible(d) and os.path.isdir(os.path.join(root, d)))


def read_class_list(path: str) -> tuple[str, ...]:
    """One class per line (first token), in label order; blank lines ignored."""
    with open(path, encoding="utf-8") as f:
        classes = tuple(line.split()[0] for line in f if line.strip())
    if len(set(classes)) != len(classes):
        raise ValueError(f"{path}: class list has duplicates")
    return classes


SPLIT_NAMES = ("train", "val", "test", "validation")  # folders that hold splits, not classes
SYNSET = re.compile(r"n\d{8}")  # an ImageNet WordNet id: n01440764


def scan_class_tree(src: str, root: str, classes: tuple[str, ...] | None, keep_empty: bool = False) -> Scan:
    """Inputs of a class-per-folder tree at `root`; `classes` pins the label order. A class folder without files
    is refused unless `keep_empty` (it would be a class the model can never learn)."""
    found = class_folders(root)
    if classes is None:
        classes = tuple(found)
        if not classes:
            raise ValueError(f"{root}: no class folders found (--layout folder expects SRC/<class>/<image>)")
    splits = [c for c in found if c in SPLIT_NAMES]
    if splits and len(splits) == len(found):
        raise ValueError(f"{root} holds split folders ({', '.join(splits)}), not classes: build each split from its "
                         f"own folder (SRC/{splits[0]} --split {splits[0]}), or use --layout imagenet for "
                         f"SRC/train/<wnid>/")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown[:10]} are not in the class list ({len(classes)} classes)")
    label_of = {c: i for i, c in enumerate(classes)}
    inputs, rejects = [], []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if _visible(name) and os.path.isfile(full):
            rejects.append((_rel(src, full), "not in a class folder: files must sit under SRC/<class>/"))
    empty = []
    for cls in found:
        files = _files_under(os.path.join(root, cls))
        empty += [] if files else [cls]
        for path in files:
            inputs.append(InputFile(_rel(src, path), path, label_of[cls], cls, _size(path)))
    if empty and not keep_empty:
        raise ValueError(f"{root}: class folder(s) {empty[:10]} hold no files: remove them, or pass "
                         f"--keep-empty-classes to keep them as classes without samples")
    return Scan(classes, inputs, rejects)


def _val_label_map(labels_file: str, synsets_file: str | None) -> dict[int, str] | dict[str, str]:
    """Kaggle CSV -> {image id: wnid}; devkit ground truth -> {image number: wnid}."""
    with open(labels_file, encoding="utf-8") as f:
        head = f.readline()
        f.seek(0)
        if head.lower().startswith("imageid"):
            rows = csv.DictReader(f)
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
        ids = [int(line) for line in f if line.strip()]
    if synsets_file is None:
        raise ValueError(f"{labels_file} is a devkit ground-truth file: pass --val-synsets with the devkit's synset order")
    order = read_class_list(synsets_file)  # line i is ILSVRC2012_ID i+1
    try:
        return {n + 1: order[i - 1] for n, i in enumerate(ids)}
    except IndexError:
        raise ValueError(f"{labels_file}: an id is out of range for {synsets_file}") from None


def check_imagenet_tree(src: str, split: str) -> None:
    """--layout imagenet reads SRC/train/<wnid>/ (and SRC/<split>/); anything else is refused, saying so."""
    expected = "--layout imagenet expects SRC/train/<wnid>/*.JPEG (and SRC/val/)"
    train_root = os.path.join(src, "train")
    if not os.path.isdir(train_root):
        seen = class_folders(src)[:3]
        hint = f"; {src} holds {', '.join(seen)}: for a class-per-folder tree use --layout folder" if seen else ""
        raise ValueError(f"{expected}, but {src} has no train/ folder{hint}")
    odd = [c for c in class_folders(train_root) if not SYNSET.fullmatch(c)]
    if odd:
        raise ValueError(f"{expected}, but {train_root} holds {odd[:3]}, not WordNet ids (n01440764): for a "
                         f"class-per-folder tree use --layout folder (SRC/train --split train)")
    if not os.path.isdir(os.path.join(src, split)):
        raise ValueError(f"{expected}; {src} has no {split}/ folder for --split {split}")


def scan_imagenet(src: str, split: str, val_labels: str | None, val_synsets: str | None,
                  classes: tuple[str, ...] | None, keep_empty: bool = False) -> Scan:
    check_imagenet_tree(src, split)
    train_root = os.path.join(src, "train")
    classes = classes or tuple(class_folders(train_root))  # sorted wnids: label 0 is n01440764
    if not classes:
        raise ValueError(f"{train_root}: no synset folders found")
    root = os.path.join(src, split)
    if split == "train" or class_folders(root):
        return scan_class_tree(src, root, classes, keep_empty)
    # flat val: ILSVRC2012_val_00000001.JPEG ...
    if val_labels is None:
        raise ValueError(f"{root} holds flat files: pass --val-labels (LOC_val_solution.csv or the devkit ground truth)")
    mapping = _val_label_map(val_labels, val_synsets)
    label_of = {c: i for i, c in enumerate(classes)}
    inputs, rejects = [], []
    for path in _files_under(root):
        source = _rel(src, path)
        stem = os.path.basename(path).split(".")[0]
        key: str | int = stem
        if stem not in mapping:
            try:
                key = int(stem.rsplit("_", 1)[-1])
            except ValueError:
                key = stem
        wnid = mapping.get(key)  # type: ignore[call-overload]
        if wnid is None:
            rejects.append((source, f"no label: {stem} is not in {os.path.basename(val_labels)}"))
        elif wnid not in label_of:
            rejects.append((source, f"no label: synset {wnid} is not among the {len(classes)} train classes"))
        else:
            inputs.append(InputFile(source, path, label_of[wnid], wnid, _size(path)))
    return Scan(classes, inputs, rejects)
