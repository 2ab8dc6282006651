"""`--layout imagenet21k`: per-synset tars read in place, copies merged into multi-label samples
by a hash join, a uniform random holdout, the 512 px default, and bad input named."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from stagewise.benchmarks.datasets import photo
from stagewise.pipeline.build_shards import build_shards
from stagewise.pipeline.cli import main as cli
from stagewise.pipeline.imagenet21k import find_units, hash_units, merge_bucket, scan_imagenet21k
from stagewise.pipeline.plan import random_holdout
from stagewise.pipeline.sources import InputFile
from stagewise.shards import decode_label, decode_meta, iter_samples, open_split

SYNSETS = ("n00000101", "n00000202", "n00000303", "n00000404", "n00000505")


def _jpeg(rng: np.random.Generator, size: tuple[int, int] | None = None) -> bytes:
    """A real photo crop (the shared generator's) as a baseline JPEG."""
    w, h = size or (int(rng.integers(48, 120)), int(rng.integers(48, 120)))
    out = io.BytesIO()
    photo(int(rng.integers(0, 2**31)), (w, h)).save(out, "JPEG", quality=85)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_21k_tree(root: Path, per_synset: int = 5, seed: int = 0) -> dict:
    """A 21k-shaped SRC: four synset tars and one extracted synset folder, with the same images
    filed under several synsets. Returns what a build must find."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shared_a, shared_b, twin = _jpeg(rng), _jpeg(rng), _jpeg(rng)
    big = _jpeg(rng, size=(600, 400))  # longer side over the 21k default of 512 px
    files: dict[str, dict[str, bytes]] = {s: {} for s in SYNSETS}
    for s in SYNSETS:
        for i in range(per_synset):
            files[s][f"{s}_{i}.JPEG"] = _jpeg(rng)
    files[SYNSETS[0]]["n00000101_a.JPEG"] = shared_a  # A under synsets 0, 2 and 3
    files[SYNSETS[2]]["n00000303_a.JPEG"] = shared_a
    files[SYNSETS[3]]["n00000404_a.JPEG"] = shared_a
    files[SYNSETS[1]]["n00000202_b.JPEG"] = shared_b  # B under 1 and 4 (4 is a folder)
    files[SYNSETS[4]]["n00000505_b.JPEG"] = shared_b
    files[SYNSETS[1]]["n00000202_t1.JPEG"] = twin  # the same bytes twice inside one synset
    files[SYNSETS[1]]["n00000202_t2.JPEG"] = twin
    files[SYNSETS[3]]["n00000404_big.JPEG"] = big
    for s in SYNSETS[:4]:
        with tarfile.open(root / f"{s}.tar", "w") as tar:
            for name, data in files[s].items():
                _add(tar, name, data)
            _add(tar, "._" + s + "_0.JPEG", b"AppleDouble")  # hidden: skipped, not an input
            if s == SYNSETS[2]:
                _add(tar, f"{s}_empty.JPEG", b"")
                _add(tar, f"{s}_notes.txt", b"not an image")
    folder = root / SYNSETS[4]
    folder.mkdir()
    for name, data in files[SYNSETS[4]].items():
        (folder / name).write_bytes(data)
    (root / "README.txt").write_text("fall11 readme")
    total = sum(len(v) for v in files.values()) + 2  # + the empty member and the text file
    return {"files": files, "a": shared_a, "b": shared_b, "twin": twin, "big": big, "total": total,
            "merged": 2 + 1 + 1}  # A: 3 copies -> 1, B: 2 -> 1, twin: 2 -> 1


def _samples(dest: str, split: str) -> list:
    view = open_split(dest, split)
    return [s for url in view.shard_urls for s in iter_samples(url)]


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def shard_bytes(dest: Path) -> dict[str, str]:
    return {p.name: _digest(p.read_bytes()) for p in sorted(dest.iterdir())
            if p.suffix in (".tar", ".idx", ".jsonl") or p.name == "manifest.json"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("in21k") / "src"
    return root, write_21k_tree(root)


def test_tars_read_in_place_become_multi_label_samples(tree, tmp_path):
    src, exp = tree
    dest = tmp_path / "out"
    train, val = build_shards(str(src), str(dest), layout="imagenet21k", holdout=4, seed=1, samples_per_shard=7)
    assert (train.split, val.split) == ("train", "val")
    assert train.duplicates == exp["merged"] and val.duplicates == 0
    rejects = {json.loads(line)["source"]: json.loads(line)["reason"]
               for line in (dest / "train-rejects.jsonl").read_text().splitlines()}
    assert rejects["README.txt"].startswith("not a synset:")
    assert rejects["n00000303.tar/n00000303_empty.JPEG"].startswith("empty file:")
    assert rejects["n00000303.tar/n00000303_notes.txt"].startswith("not an image:")
    assert len(rejects) == 3
    # every file is accounted for: files = written + rejected + merged (README is not a file of a synset)
    assert train.written + val.written + len(rejects) - 1 + train.duplicates == exp["total"]
    assert train.balanced and val.balanced

    samples = _samples(str(dest), "train") + _samples(str(dest), "val")
    by_bytes: dict[str, list] = {}
    for s in samples:
        by_bytes.setdefault(_digest(s.jpg), []).append(s)
    assert all(len(v) == 1 for v in by_bytes.values())  # no image twice, not even across train and val
    a = by_bytes[_digest(exp["a"])][0]
    assert a.labels == (0, 2, 3) and a.label == 0 and a.class_name == SYNSETS[0]
    assert a.source == "n00000101.tar/n00000101_a.JPEG"  # the copy under the lowest label
    b = by_bytes[_digest(exp["b"])][0]
    assert b.labels == (1, 4) and b.source == "n00000202.tar/n00000202_b.JPEG"
    assert by_bytes[_digest(exp["twin"])][0].labels == (1,)
    for s in samples:  # members were read in place: copied byte for byte from inside the tars
        assert s.labels is not None and list(s.labels) == sorted(set(s.labels)) and s.label == s.labels[0]
        assert s.class_name == SYNSETS[s.label]
        if s.source.split("/")[0].endswith(".tar") and "big" not in s.source:
            synset, name = s.source.split(".tar/")
            assert s.jpg == exp["files"][synset][name]
    big = next(s for s in samples if s.source.endswith("_big.JPEG"))
    assert (big.width, big.height) == (512, 341)  # 600x400 downscaled to the 21k default longer side
    for split in ("train", "val"):
        assert open_split(str(dest), split).info.multi_label


def test_cls_and_json_agree_in_the_raw_members(tree, tmp_path):
    """What DALI reads: `cls` is the first label, `json` carries the sorted list."""
    src, exp = tree
    build_shards(str(src), str(tmp_path / "out"), layout="imagenet21k", holdout=0, samples_per_shard=50)
    [url] = open_split(str(tmp_path / "out"), "train").shard_urls
    with tarfile.open(url) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = {name.split(".")[0] for name in members}
    multi = 0
    for key in keys:
        meta = decode_meta(members[f"{key}.json"])
        assert decode_label(members[f"{key}.cls"]) == meta["label"] == meta["labels"][0]
        multi += len(meta["labels"]) > 1
    assert multi == 2  # A and B


def test_the_join_does_not_depend_on_workers_buckets_or_packaging(tree, tmp_path):
    src, exp = tree
    one = tmp_path / "one"
    two = tmp_path / "two"
    build_shards(str(src), str(one), layout="imagenet21k", holdout=3, seed=5, samples_per_shard=6, workers=1)
    build_shards(str(src), str(two), layout="imagenet21k", holdout=3, seed=5, samples_per_shard=6, workers=2)
    assert shard_bytes(one) == shard_bytes(two)
    # the same records joined through 1 bucket or 7 give the same inputs
    units, _ = find_units(str(src))
    label_of = {s: i for i, s in enumerate(SYNSETS)}
    by_one = merge_bucket(hash_units(units, label_of, 1)[0], SYNSETS)
    parts7 = hash_units(units, label_of, 7)[0]
    by_seven = [merge_bucket([p], SYNSETS) for p in parts7]
    def by_source(xs):
        return sorted(xs, key=lambda x: x.source)

    assert by_source(by_one[0]) == by_source(x for p, _ in by_seven for x in p)
    assert by_one[1] == sum(m for _, m in by_seven) == exp["merged"]
    assert sum(1 for p in parts7 if p) > 1  # the records really were spread over buckets


def test_extracted_tree_gives_the_same_samples(tree, tmp_path):
    src, _ = tree
    extracted = tmp_path / "extracted"
    for unit in find_units(str(src))[0]:
        if unit.is_tar:
            with tarfile.open(unit.path) as tar:
                tar.extractall(extracted / unit.synset, filter="data")
        else:
            (extracted / unit.synset).mkdir(parents=True)
            for p in Path(unit.path).iterdir():
                (extracted / unit.synset / p.name).write_bytes(p.read_bytes())
    a = scan_imagenet21k(str(src), None, workers=1, executor="local", ray_address=None)
    b = scan_imagenet21k(str(extracted), None, workers=1, executor="local", ray_address=None)
    assert a.duplicates == b.duplicates > 0
    assert [(x.labels, x.size, x.source.replace(".tar/", "/")) for x in a.inputs] == \
        [(x.labels, x.size, x.source) for x in b.inputs]
    assert all(x.offset >= 0 for x in a.inputs if ".tar/" in x.source)
    assert all(x.read() == y.read() for x, y in zip(a.inputs, b.inputs, strict=True))


def test_class_file_pins_the_label_order_and_names_strangers(tree, tmp_path):
    src, _ = tree
    order = ("n00000505", "n99999999") + SYNSETS[:4]  # 21k checkpoints have slots with no images
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(order) + "\n")
    scan = scan_imagenet21k(str(src), order, workers=1, executor="local", ray_address=None)
    assert scan.classes == order
    b = next(x for x in scan.inputs if x.labels == (0, 3))  # B: n00000505 -> 0, n00000202 -> 3,
    # so the copy in the n00000505/ folder is now the canonical one
    assert b.source == "n00000505/n00000505_b.JPEG" and b.class_name == "n00000505" and b.offset == -1
    with pytest.raises(ValueError, match=r"n00000303"):
        scan_imagenet21k(str(src), order[:3], workers=1, executor="local", ray_address=None)


def test_bad_trees_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no synset tars"):
        scan_imagenet21k(str(empty), None, workers=1, executor="local", ray_address=None)
    both = tmp_path / "both"
    (both / "n00000001").mkdir(parents=True)
    with tarfile.open(both / "n00000001.tar", "w"):
        pass
    with pytest.raises(ValueError, match=r"n00000001 is given twice"):
        find_units(str(both))


def test_broken_tars_are_rejected_and_good_members_kept(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    good = [_jpeg(rng) for _ in range(3)]
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        for i, data in enumerate(good):
            _add(tar, f"img_{i}.JPEG", data)
    raw = plain.getvalue()
    (src / "n00000001.tar").write_bytes(gzip.compress(raw))  # .tar.gz named .tar
    (src / "n00000002.tar").write_bytes(b"this is not a tar file at all" * 40)
    second = raw.index(good[1]) - 512  # header of the second member
    (src / "n00000003.tar").write_bytes(raw[:second] + b"\x7f" * 512 + raw[second + 512:])  # garbage header
    (src / "n00000004.tar").write_bytes(raw[: raw.index(good[2]) + 100])  # cut inside the third member
    scan = scan_imagenet21k(str(src), None, workers=1, executor="local", ray_address=None)
    reasons = dict(scan.rejects)
    assert reasons["n00000001.tar"].startswith("compressed tar: gzip")
    assert reasons["n00000002.tar"].startswith("not a tar:")
    assert reasons["n00000003.tar"].startswith("corrupt tar:") and "after 1 members" in reasons["n00000003.tar"]
    assert reasons["n00000004.tar/img_2.JPEG"].startswith("unreadable: truncated")
    kept = {x.source: x.labels for x in scan.inputs}
    assert kept == {"n00000003.tar/img_0.JPEG": (2, 3), "n00000004.tar/img_1.JPEG": (3,)}
    assert scan.duplicates == 1  # img_0 survived in 3 and 4, img_1 only in 4
    assert next(x for x in scan.inputs if x.source.endswith("img_1.JPEG")).read() == good[1]


def test_random_holdout_is_uniform_seeded_and_exact():
    inputs = [InputFile(f"s{c}/{i}", "/x", c, f"s{c}", 1) for c in range(50) for i in range(1 if c < 40 else 60)]
    rest, held = random_holdout(inputs, 100, seed=0)
    assert len(held) == 100 and len(rest) == len(inputs) - 100
    assert not {x.source for x in rest} & {x.source for x in held}
    assert random_holdout(inputs, 100, seed=0)[1] == held and random_holdout(inputs, 100, seed=1)[1] != held
    # uniform, not class-balanced: the 40 one-image classes (40 of 640 images) keep most of their images
    assert sum(x.label < 40 for x in held) < 25
    with pytest.raises(ValueError, match="--holdout 640"):
        random_holdout(inputs, 640, seed=0)


def test_cli_prints_the_merged_count_and_defaults_to_a_val_split(tree, tmp_path, capsys):
    src, exp = tree
    dest = tmp_path / "out"
    # the default holdout is 100,000 images: far more than this tree has, and the error says so
    assert cli(["build-shards", str(src), str(dest), "--layout", "imagenet21k", "--no-progress"]) == 2
    assert "--holdout 100000 must be smaller" in capsys.readouterr().err
    assert cli(["build-shards", str(src), str(dest), "--layout", "imagenet21k", "--holdout", "2",
                "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"merged    {exp['merged']:>9,}  duplicate files" in out
    assert "split 'val'" in out and "MB in)" in out
    assert open_split(str(dest), "val").num_samples == 2


def test_the_loader_yields_normalized_multi_label_targets(tree, tmp_path):
    """Paper §5.2: "we normalize the labels to have sum of 1 before computing softmax loss"."""
    import torch

    from stagewise.loaders import Loader, StageParams

    src, exp = tree
    dest = tmp_path / "out"
    build_shards(str(src), str(dest), layout="imagenet21k", holdout=0, samples_per_shard=7)
    n = open_split(str(dest), "train").num_samples
    assert n == 29  # 33 image files, 4 copies merged
    # every sample in one batch: training drops a partial last batch
    loader = Loader(str(dest), split="train", batch_size=n, device="cpu", num_threads=1,
                    stage=StageParams(image_size=32, randaug_magnitude=0, mixup_alpha=0))
    loader.set_epoch(0)
    rows = torch.cat([targets for _, targets in loader])
    assert rows.shape == (n, len(SYNSETS)) and rows.dtype == torch.float32
    assert torch.allclose(rows.sum(1), torch.ones(n))
    multi = {tuple(torch.nonzero(r).flatten().tolist()): r[r > 0].tolist() for r in rows if (r > 0).sum() > 1}
    assert multi.keys() == {(0, 2, 3), (1, 4)}
    assert multi[(0, 2, 3)] == pytest.approx([1 / 3] * 3) and multi[(1, 4)] == pytest.approx([0.5, 0.5])
