"""`pipeline bench-model` end to end, at a tiny size so it takes seconds: JSON rows and the printed table."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("timm")

from stagewise.benchmarks import bench_model  # noqa: E402


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_model.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_defaults():
    args = _args()
    assert (args.device, args.sizes, args.dtype, args.channels_last, args.compile, args.json) == (
        "cpu", "128,192,256,300", "fp32", False, False, False)


def test_json_rows(capsys):
    rc = bench_model.run(_args("--sizes", "32,64", "--batch", "2", "--steps", "1", "--rounds", "2", "--json"))
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["size"] for r in rows] == [32, 64]
    for r in rows:
        assert set(r) == {"size", "ours_img_s", "timm_img_s", "ratio"}
        assert r["ours_img_s"] > 0 and r["timm_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["ours_img_s"] / r["timm_img_s"], rel=0.01)


def test_table_channels_last_bf16(capsys):
    rc = bench_model.run(_args("--sizes", "32", "--batch", "2", "--steps", "1", "--rounds", "1",
                               "--channels-last", "--dtype", "bf16"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "channels_last" in out and "bf16" in out
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "32" and last[-1].endswith("x") and float(last[-1][:-1]) > 0
