"""build-shards: write -> read round trips, quirks, accounting, determinism, resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from stagewise.benchmarks.bench_build import make_input
from stagewise.pipeline.build_shards import _start_method, build_shards, parse_size
from stagewise.pipeline.cli import main as cli
from stagewise.pipeline.imagefix import reencode_path
from stagewise.shards import Sample, ShardWriter, iter_samples, make_key, open_split, read_index, read_manifest
from tests.conftest import write_solid_tree
from stagewise.benchmarks.datasets import photo, write_photo_tree
from tests.quirks import BOMB_LIMIT, write_quirk_tree

REPO = Path(__file__).resolve().parents[1]


def _all_samples(dest: str, split: str):
    view = open_split(dest, split)
    return [s for url in view.shard_urls for s in iter_samples(url)]


def _tree_bytes(dest: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dest.iterdir())
            if p.suffix in (".tar", ".idx", ".jsonl") or p.name == "manifest.json"}


def test_quirks_are_fixed_or_rejected_and_every_file_is_accounted_for(tmp_path):
    expected = write_quirk_tree(tmp_path / "src", ["cat", "dog"], per_class=13)
    dest = tmp_path / "out"
    [report] = build_shards(str(tmp_path / "src"), str(dest), split="train", samples_per_shard=6,
                            max_pixels=BOMB_LIMIT, seed=1)
    assert report.balanced and report.inputs == len(expected)
    samples = {s.source: s for s in _all_samples(str(dest), "train")}
    rejects = {r["source"]: r["reason"] for r in map(json.loads, (dest / "train-rejects.jsonl").read_text().splitlines())}
    assert set(samples) | set(rejects) == set(expected) and not set(samples) & set(rejects)
    for source, exp in expected.items():
        if exp.reject:
            assert rejects[source].startswith(exp.reject + ":"), (source, rejects[source])
            continue
        s = samples[source]
        with Image.open(io.BytesIO(s.jpg)) as im:
            im.load()
            assert (im.format, im.mode) == ("JPEG", "RGB")
            assert "progressive" not in im.info and "progression" not in im.info
            assert im.size == (s.width, s.height)
        if exp.rotated:
            assert (s.width, s.height) == (60, 80)  # 80x60 photo with EXIF orientation 6
        if not exp.fixes:
            assert s.jpg == (tmp_path / "src" / source).read_bytes()  # copied byte for byte
    want_fixes = Counter(f for e in expected.values() if not e.reject for f in e.fixes)
    assert report.fixes == dict(want_fixes)
    assert report.reject_reasons == dict(Counter(e.reject for e in expected.values() if e.reject))


def test_labels_classes_and_shuffle(tmp_path):
    write_solid_tree(tmp_path / "src", num_classes=4, per_class=10)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=8, seed=3)
    view = open_split(str(tmp_path / "out"), "train")
    assert view.classes == ("class_0", "class_1", "class_2", "class_3")
    assert view.num_samples == 40 and len(view.shard_urls) == 5
    assert view.info.class_counts == (10, 10, 10, 10)
    per_shard = [{s.label for s in iter_samples(u)} for u in view.shard_urls]
    assert all(len(labels) >= 2 for labels in per_shard)  # shuffled across shards
    for url in view.shard_urls:
        for s in iter_samples(url):
            assert s.class_name == f"class_{s.label}" and s.source.startswith(s.class_name + "/")
            with Image.open(io.BytesIO(s.jpg)) as im:
                r, g, b = im.convert("RGB").resize((1, 1)).getpixel((0, 0))
            from tests.conftest import PALETTE
            assert max(abs(a - e) for a, e in zip((r, g, b), PALETTE[s.label])) < 12


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    write_photo_tree(tmp_path / "src", num_classes=3, per_class=6)
    build_shards(str(tmp_path / "src"), str(tmp_path / "a"), samples_per_shard=5, seed=7, workers=1)
    build_shards(str(tmp_path / "src"), str(tmp_path / "b"), samples_per_shard=5, seed=7, workers=2)
    build_shards(str(tmp_path / "src"), str(tmp_path / "c"), samples_per_shard=5, seed=8, workers=1)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c  # another seed, another assignment
    keys_a = sorted(s.key for s in _all_samples(str(tmp_path / "a"), "train"))
    keys_c = sorted(s.key for s in _all_samples(str(tmp_path / "c"), "train"))
    assert keys_a == keys_c  # keys depend on the source only


def test_forked_and_spawned_workers_write_the_same_bytes(tmp_path):
    write_photo_tree(tmp_path / "src", num_classes=3, per_class=6)
    build_shards(str(tmp_path / "src"), str(tmp_path / "a"), samples_per_shard=5, workers=2, max_side=64)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()  # a second thread: workers must be spawned, not forked
    try:
        assert _start_method() == "spawn"
        build_shards(str(tmp_path / "src"), str(tmp_path / "b"), samples_per_shard=5, workers=2, max_side=64)
    finally:
        stop.set()
        other.join()
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    samples = [Sample(key=make_key(f"c/{i}.jpg"), jpg=os.urandom(i * 311), label=i % 3, class_name="c",
                      source=f"c/{i}.jpg", width=4, height=3) for i in range(25)]  # payloads of 0 to 7,464 bytes
    writer = ShardWriter(str(tmp_path / "ours.tar"))
    for s in samples:
        writer.write(s)
    written = writer.close()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in s.members():
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(payload), 0, 0o444, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(payload))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "ref.tar").read_bytes()
    assert (written.bytes, written.sha256, written.num_samples) == (len(ours), hashlib.sha256(ours).hexdigest(), 25)


def test_bench_build_on_a_made_input(tmp_path, capsys):
    make_input(str(tmp_path / "again"), 8)
    assert cli(["bench-build", str(tmp_path / "src"), "--make-input", "8", "--rounds", "1", "--max-sides", "64",
                "--workers", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    made = sorted(p.relative_to(tmp_path / "src") for p in (tmp_path / "src").rglob("*.jpg"))
    assert len(made) == 8 and len({p.parent for p in made}) == 8  # 8 class folders of 10 used
    assert all((tmp_path / "src" / p).read_bytes() == (tmp_path / "again" / p).read_bytes() for p in made)
    assert "500x375 x6, 1000x750 x2" in result["input"]
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == ["re-encode, --max-side 64", "copy, decode-checked", "copy, --fast-copy"]
    assert rows["re-encode, --max-side 64"]["note"] == f"8 resized, {reencode_path()}"
    assert all(r["note"].startswith("8 copied byte for byte") for c, r in rows.items() if c.startswith("copy"))
    for r in rows.values():
        assert r["images"] == 8 and r["workers"] == 2
        assert r["ratio_per_core"] == pytest.approx(r["ours_img_s"] / r["baseline_img_s"] / 2)
        assert r["ratio_per_core_cpu"] == pytest.approx(r["baseline_cpu_ms"] / r["ours_cpu_ms"])


def test_index_files_equal_dalis_wds2idx(tmp_path):
    write_photo_tree(tmp_path / "src", num_classes=2, per_class=5)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=4)
    view = open_split(str(tmp_path / "out"), "train")
    wds2idx = Path(sys.executable).with_name("wds2idx")
    for shard, idx in zip(view.shard_urls, view.index_urls):
        ref = tmp_path / "ref.idx"
        subprocess.run([str(wds2idx), shard, str(ref)], check=True, capture_output=True)
        assert read_index(idx) == ref.read_text()


def test_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    write_photo_tree(tmp_path / "src", num_classes=3, per_class=4)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=5)
    view = open_split(str(tmp_path / "out"), "train")
    got = list(wds.WebDataset(view.shard_urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "json"))
    assert len(got) == 12
    for image, label, meta in got:
        assert image.size == (meta["width"], meta["height"]) and label == meta["label"]
        assert meta["class"] == f"class_{label}"


def test_read_back_with_dali_cpu_using_index_files(tmp_path):
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    write_photo_tree(tmp_path / "src", num_classes=3, per_class=5)
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), samples_per_shard=4)
    view = open_split(str(tmp_path / "out"), "train")

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=view.shard_urls, index_paths=view.index_urls, ext=["jpg", "cls"],
                                         random_shuffle=False, name="reader")
        return fn.decoders.image(jpg, device="cpu"), cls

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == 15
    labels = []
    for _ in range(3):
        images, cls = p.run()
        for i in range(len(images)):
            assert np.asarray(images[i]).shape[2] == 3
            labels.append(int(bytes(np.asarray(cls[i])).decode()))
    assert Counter(labels) == {0: 5, 1: 5, 2: 5}


def test_holdout_is_class_balanced_and_disjoint(tmp_path):
    write_solid_tree(tmp_path / "src", num_classes=4, per_class=10)
    reports = build_shards(str(tmp_path / "src"), str(tmp_path / "out"), holdout=8, samples_per_shard=16)
    assert [r.split for r in reports] == ["train", "minival"]
    train = {s.source for s in _all_samples(str(tmp_path / "out"), "train")}
    mini = _all_samples(str(tmp_path / "out"), "minival")
    assert len(train) == 32 and len(mini) == 8 and not train & {s.source for s in mini}
    assert Counter(s.label for s in mini) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_another_split_keeps_the_others_and_reuses_class_order(tmp_path):
    write_solid_tree(tmp_path / "train", num_classes=3, per_class=4)
    write_solid_tree(tmp_path / "val", num_classes=3, per_class=2)
    order = ("class_2", "class_0", "class_1")  # not the sorted order a recomputed list would have
    (tmp_path / "classes.txt").write_text("\n".join(order) + "\n")
    build_shards(str(tmp_path / "train"), str(tmp_path / "out"), split="train",
                 classes_file=str(tmp_path / "classes.txt"))
    build_shards(str(tmp_path / "val"), str(tmp_path / "out"), split="val")  # no class list: reuse train's
    manifest = read_manifest(str(tmp_path / "out"))
    assert sorted(manifest.splits) == ["train", "val"]
    assert manifest.split("train").classes == manifest.split("val").classes == order
    assert {(s.label, s.class_name) for s in _all_samples(str(tmp_path / "out"), "val")} == {
        (0, "class_2"), (1, "class_0"), (2, "class_1")}
    (tmp_path / "val" / "new_class").mkdir()
    with pytest.raises(ValueError, match="new_class"):
        build_shards(str(tmp_path / "val"), str(tmp_path / "out"), split="val")


def _imagenet_tree(root: Path) -> dict[str, str]:
    wnids = ["n01440764", "n01443537", "n02102040"]
    for c, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(3):
            photo(c * 10 + i).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
    (root / "val").mkdir()
    truth = {}
    for n in range(1, 7):
        name = f"ILSVRC2012_val_{n:08d}"
        photo(100 + n).save(root / "val" / f"{name}.JPEG", quality=90)
        truth[name] = wnids[n % 3]
    return truth


def test_imagenet_layout_with_kaggle_and_devkit_val_labels(tmp_path):
    truth = _imagenet_tree(tmp_path / "in")
    del truth["ILSVRC2012_val_00000006"]  # this one has no label: must be rejected, not lost
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(f"{k},{v} 1 2 3 4\n" for k, v in truth.items()))
    out = str(tmp_path / "out")
    build_shards(str(tmp_path / "in"), out, layout="imagenet", split="train")
    [val] = build_shards(str(tmp_path / "in"), out, layout="imagenet", split="val", val_labels=str(csv))
    assert val.written == 5 and val.rejected == 1 and val.reject_reasons == {"no label": 1}
    classes = read_manifest(out).split("train").classes
    assert classes == ("n01440764", "n01443537", "n02102040")
    for s in _all_samples(out, "val"):
        stem = s.source.split("/")[-1].split(".")[0]
        assert classes[s.label] == truth[stem] == s.class_name
    # devkit form: one ILSVRC2012_ID per line, ids indexing the devkit's own synset order
    devkit_order = ["n02102040", "n01440764", "n01443537"]
    (tmp_path / "synsets.txt").write_text("".join(f"{w} name\n" for w in devkit_order))
    gt = [str(devkit_order.index(truth.get(f"ILSVRC2012_val_{n:08d}", "n01440764")) + 1) for n in range(1, 7)]
    (tmp_path / "gt.txt").write_text("\n".join(gt) + "\n")
    [val2] = build_shards(str(tmp_path / "in"), str(tmp_path / "out2"), layout="imagenet", split="val",
                          val_labels=str(tmp_path / "gt.txt"), val_synsets=str(tmp_path / "synsets.txt"))
    assert val2.written == 6
    by_stem = {s.source.split("/")[-1].split(".")[0]: s.class_name for s in _all_samples(str(tmp_path / "out2"), "val")}
    assert all(by_stem[k] == v for k, v in truth.items())


def test_max_side_downscales(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    photo(0, size=(300, 200)).save(tmp_path / "src" / "a" / "big.jpg", quality=90)
    photo(1, size=(60, 40)).save(tmp_path / "src" / "a" / "small.jpg", quality=90)
    [r] = build_shards(str(tmp_path / "src"), str(tmp_path / "out"), max_side=100)
    sizes = {s.source: (s.width, s.height) for s in _all_samples(str(tmp_path / "out"), "train")}
    assert sizes == {"a/big.jpg": (100, 67), "a/small.jpg": (60, 40)}
    assert r.fixes == {"resized": 1} and r.copied == 1


def test_verify_catches_a_corrupted_shard_and_stats_prints(tmp_path, capsys):
    write_photo_tree(tmp_path / "src", num_classes=2, per_class=6)
    out = tmp_path / "out"
    build_shards(str(tmp_path / "src"), str(out), samples_per_shard=4)
    assert cli(["verify-shards", str(out), "--workers", "1"]) == 0
    assert cli(["stats", str(out)]) == 0
    assert "train" in capsys.readouterr().out
    shard = out / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first jpg
    shard.write_bytes(bytes(data))
    assert cli(["verify-shards", str(out), "--workers", "1"]) == 1
    printed = capsys.readouterr().out
    assert "BAD train-000001.tar" in printed and "sha256" in printed and "train-000000.tar" not in printed


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    assert cli(["build-shards", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing" in capsys.readouterr().err
    write_solid_tree(tmp_path / "src", 2, 2)
    assert cli(["build-shards", str(tmp_path / "src"), str(tmp_path / "out"), "--quality", "0", "--no-progress"]) == 2
    assert "--quality 0" in capsys.readouterr().err
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("512") == 512


def test_shard_size_target(tmp_path):
    write_photo_tree(tmp_path / "src", num_classes=2, per_class=10)
    total = sum(p.stat().st_size for p in (tmp_path / "src").rglob("*.jpg"))
    build_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_bytes=total // 4)
    shards = read_manifest(str(tmp_path / "out")).split("train").shards
    assert 4 <= len(shards) <= 6
    assert all(s.bytes < total // 2 for s in shards)


def test_version_names_the_active_pillow(capsys):
    with pytest.raises(SystemExit):
        cli(["--version"])
    out = capsys.readouterr().out
    import PIL
    assert out.startswith("stagewise ") and PIL.__version__ in out and "Pillow" in out and "re-encode: " in out


def test_kill_and_resume_gives_identical_bytes(tmp_path):
    write_photo_tree(tmp_path / "src", num_classes=4, per_class=30)
    cmd = [sys.executable, "-m", "stagewise.pipeline", "build-shards", str(tmp_path / "src"), "{dest}", "--workers", "1",
           "--samples-per-shard", "4", "--max-side", "96", "--seed", "5", "--no-progress"]
    run = lambda dest: [c.replace("{dest}", str(dest)) for c in cmd]  # noqa: E731
    subprocess.run(run(tmp_path / "whole"), check=True, capture_output=True, cwd=REPO)

    proc = subprocess.Popen(run(tmp_path / "resumed"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = tmp_path / "resumed" / "_journal"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(journal.glob("*.json")) if journal.exists() else []) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(journal.glob("*.json")))
    assert 3 <= done_at_kill < 30, "the build was not killed mid-way"
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    result = subprocess.run(run(tmp_path / "resumed"), check=True, capture_output=True, text=True, cwd=REPO)
    resumed = int(result.stdout.split(" shards resumed")[0].rsplit(" ", 1)[-1])
    assert resumed >= done_at_kill
    assert _tree_bytes(tmp_path / "resumed") == _tree_bytes(tmp_path / "whole")
    assert not list((tmp_path / "resumed").glob(".*tmp*"))
