"""The one image generator (stagewise.benchmarks.datasets): the texture task keeps val pixels out of training,
and the writers folded into it from the tests and bench-build still write the same pixels."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagewise.benchmarks import datasets
from stagewise.benchmarks.datasets import (
    make_input,
    mosaic,
    overlapping_patches,
    photo,
    write_crop_tree,
    write_photo_tree,
    write_texture_task,
)


@pytest.fixture(scope="module")
def texture_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    summary = write_texture_task(root, train_per_class=6, val_per_class=3, seed=1)
    return root, summary


def test_texture_train_and_val_patches_of_a_photo_never_overlap(texture_task):
    root, summary = texture_task
    assert json.loads((root / "textures.json").read_text()) == summary
    assert overlapping_patches(summary) == []
    # Independently of overlapping_patches: paint every train window, then look under every val window.
    train_pixels = {name: np.zeros((h, w), bool) for name, (w, h) in summary["photos"].items()}
    for p in summary["patches"]:
        if p["split"] == "train":
            x0, y0, x1, y1 = p["box"]
            train_pixels[p["photo"]][y0:y1, x0:x1] = True
    val = [p for p in summary["patches"] if p["split"] == "val"]
    assert len(val) == 3 * len(summary["classes"])
    for p in val:
        x0, y0, x1, y1 = p["box"]
        assert not train_pixels[p["photo"]][y0:y1, x0:x1].any(), f"{p['file']} shows pixels a train patch showed"
    # Every window lies inside its photo, and inside its own split's part of a region of its class.
    for p in summary["patches"]:
        x0, y0, x1, y1 = p["box"]
        w, h = summary["photos"][p["photo"]]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert any(r["class"] == p["class"] and r["split"] == p["split"] and r["photo"] == p["photo"]
                   and r["box"][0] <= x0 and r["box"][1] <= y0 and x1 <= r["box"][2] and y1 <= r["box"][3]
                   for r in summary["regions"])


def test_texture_patches_show_their_recorded_windows(texture_task):
    """The boxes are the truth: each file is its window, resized, turned and standardized (JPEG aside)."""
    root, summary = texture_task
    assert {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")} == {p["file"] for p in summary["patches"]}
    for p in summary["patches"][::7]:
        x0, y0, x1, y1 = p["box"]
        expect = datasets._patch(datasets._gray(p["photo"]), (x0, y0, x1 - x0), summary["size"], p["orientation"],
                                 summary["contrast"])
        got = np.asarray(Image.open(root / p["file"]).convert("RGB"), dtype=np.float32)
        assert got.shape == (summary["size"], summary["size"], 3)
        assert np.abs(got - np.asarray(expect, dtype=np.float32)).mean() < 4.0, p["file"]


def test_texture_patches_share_mean_and_spread_and_have_no_colour(texture_task):
    root, summary = texture_task
    checked = 0
    for p in summary["patches"]:
        arr = np.asarray(Image.open(root / p["file"]).convert("RGB"), dtype=np.float32)
        assert np.abs(arr[..., 0] - arr[..., 2]).max() <= 12  # gray (JPEG chroma noise aside)
        if ((arr <= 1) | (arr >= 254)).mean() < 0.01:  # hardly clipped (stars on black clip at white)
            assert abs(arr.mean() - 128) < 4 and abs(arr.std() - summary["contrast"]) < 4, p["file"]
            checked += 1
    assert checked > len(summary["patches"]) // 3


def test_overlap_check_finds_an_overlap():
    summary = {"patches": [
        {"file": "train/a/0.jpg", "photo": "p", "split": "train", "box": [0, 0, 10, 10]},
        {"file": "val/a/0.jpg", "photo": "p", "split": "val", "box": [9, 9, 20, 20]},
        {"file": "val/a/1.jpg", "photo": "p", "split": "val", "box": [10, 0, 20, 10]},  # shares an edge only
        {"file": "val/a/2.jpg", "photo": "q", "split": "val", "box": [0, 0, 10, 10]},  # another photo
    ]}
    assert overlapping_patches(summary) == [("train/a/0.jpg", "val/a/0.jpg")]


def test_texture_cli_refuses_a_full_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert datasets.main(["textures", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


# --- The folded writers: the same pixels as before the fold ------------------------------------------------


class _Saved(list):
    """Image.save replaced: (path relative to root, pixels) in save order; nothing is encoded."""


@pytest.fixture()
def saved(monkeypatch, tmp_path):
    out = _Saved()

    def fake_save(self, fp, *args, **kwargs):  # noqa: ANN001, ANN202
        out.append((os.path.relpath(str(fp), tmp_path), np.asarray(self.convert("RGB"))))

    monkeypatch.setattr(Image.Image, "save", fake_save)
    return out


def _digest(items) -> str:  # noqa: ANN001
    h = hashlib.sha256()
    for name, arr in items:
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


# Recorded from tests/conftest.py, tests/quirks.py, bench_build.make_input and the photo-tree module as
# they were before they moved here (before 1aa32f4) (scikit-learn's photos; numpy's default_rng streams). The plain crops
# are compared pixel for pixel; the resampled ones by their mean, which a different Pillow build's
# resampling may nudge but a different crop would not keep.
PHOTO_TREE_DIGEST = "000e431cc7000eab"
PHOTO_DIGEST = "2d4757a70d3fceb9"
MOSAIC_DIGEST = "e94f161953ba8e85"
MAKE_INPUT_MEANS = [("b/class0/000000.jpg", (375, 500, 3), 69.5), ("b/class1/000001.jpg", (375, 500, 3), 76.6),
                    ("b/class2/000002.jpg", (375, 500, 3), 63.7), ("b/class3/000003.jpg", (750, 1000, 3), 101.4),
                    ("b/class4/000004.jpg", (375, 500, 3), 135.1)]
CROP_TREE_MEANS = [("c/class_000/img_000000.jpg", 65.3), ("c/class_001/img_000001.jpg", 78.2),
                   ("c/class_002/img_000002.jpg", 140.6), ("c/class_000/img_000003.jpg", 74.6),
                   ("c/class_001/img_000004.jpg", 156.0)]


def test_folded_writers_still_write_what_they_wrote(saved, tmp_path):
    write_photo_tree(tmp_path / "a", num_classes=3, per_class=4, seed=1)
    assert [n for n, _ in saved][:2] == ["a/class_0/photo_0.jpg", "a/class_0/photo_1.jpg"]
    assert _digest(saved) == PHOTO_TREE_DIGEST
    assert _digest([(str(s), np.asarray(photo(s))) for s in range(6)]
                   + [("big", np.asarray(photo(3, (160, 120))))]) == PHOTO_DIGEST
    assert _digest([("m", np.asarray(mosaic((300, 200), 2)))]) == MOSAIC_DIGEST
    saved.clear()
    make_input(str(tmp_path / "b"), 5, seed=0)
    assert [(n, a.shape) for n, a in saved] == [(n, shape) for n, shape, _ in MAKE_INPUT_MEANS]
    assert [a.mean() for _, a in saved] == pytest.approx([m for _, _, m in MAKE_INPUT_MEANS], abs=0.5)
    saved.clear()
    write_crop_tree(Path(tmp_path / "c"), 0, 5, 3, (64, 48), 90, 0)
    assert [n for n, _ in saved] == [n for n, _ in CROP_TREE_MEANS]
    assert all(a.shape == (48, 64, 3) for _, a in saved)
    assert [a.mean() for _, a in saved] == pytest.approx([m for _, m in CROP_TREE_MEANS], abs=0.5)


def test_the_generator_is_the_only_image_writer():
    """No test helper or benchmark grows its own copy of the photo writers again (issue 11: there were four)."""
    import ast

    from stagewise.benchmarks import bench_build
    from tests import quirks

    names = {"write_photo_tree", "photo", "mosaic", "make_input", "write_crop_tree"}
    repo = Path(__file__).resolve().parents[1]
    defined = []
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo)
        if rel.parts[0].startswith(".") or rel.parts[0] in {"build", "docker"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                defined.append(f"{rel}:{node.name}")
    assert sorted(defined) == sorted(f"benchmarks/datasets.py:{n}" for n in names)
    assert quirks.photo is photo
    assert bench_build.make_input is make_input


def test_source_photos_ship_with_packages():
    for name in datasets.SOURCES:
        assert os.path.isfile(datasets.source_path(name)), name
    assert datasets.source_photo("gravel").shape == (512, 512)
    assert datasets.source_photo("china").shape == (427, 640, 3)
    with pytest.raises(ValueError, match="nope"):
        datasets.source_path("nope")
