"""Checkpoints that appear whole or not at all, locally or on s3://, and hold everything a bit-exact resume needs.

A checkpoint is one `torch.save` payload: model, EMA, optimizer, step/epoch/stage,
the loader's position, every RNG state (Python, NumPy, torch CPU, CUDA) and the
redacted config. It is written to a temporary name, fsynced and renamed
(locally), or uploaded in one PUT (object stores), so a `kill -9` mid-write
leaves the previous checkpoint intact (`shards.store.write_atomic`, the one
atomic writer). `config.yaml` is written beside it. Loading uses
`torch.load(weights_only=True)`: the payload holds only tensors and plain
Python values, so nothing in a checkpoint can execute code.
"""
from __future__ import annotations

import io
import json
import random

import numpy as np
import torch

from stagewise.shards.store import join_url, open_url, parent_url, url_exists, write_atomic

LATEST = "last.pt"  # overwritten every `run.ckpt_every` steps and at stage ends
CONFIG_NAME = "config.yaml"


def stage_name(stage: int) -> str:
    """`stage-2.pt`: kept after stage 2 (1-based) ends."""
    return f"stage-{stage}.pt"


def save(url: str, payload: dict, config_yaml: str) -> None:
    """Write the checkpoint, then the config beside it."""
    write_atomic(url, lambda f: torch.save(payload, f))
    write_atomic(join_url(parent_url(url), CONFIG_NAME), config_yaml.encode("utf-8"))


def load(url: str) -> dict:
    """A checkpoint's payload on the CPU; a clear error when it is missing or not a checkpoint."""
    if not url_exists(url):
        raise FileNotFoundError(f"no checkpoint at {url}")
    with open_url(url, "rb") as f:
        data = f.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"{url} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{url} is not a stagewise checkpoint (no 'model' entry)")
    return payload


# --- RNG states, as plain values that weights_only loading accepts ---------------------------


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG states, in rank order (each rank resumes with its own)."""
    if world_size == 1:
        return [rng_state()]
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, rng_state())
    return out


def plain(x):  # noqa: ANN001, ANN201 - any JSON-able tree
    """`x` as plain JSON values (numpy scalars become numbers), which weights_only loading accepts."""
    return json.loads(json.dumps(x, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _tuples(x):  # noqa: ANN001, ANN202 - random.setstate needs tuples back where lists may come out
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
