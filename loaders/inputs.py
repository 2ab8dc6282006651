"""The DALI graph's inputs outside RandAugment, declared once: each name, its element type and rank.

graph.py builds an `fn.external_source` per name from this table (`ops.source`) and lists the
inputs in feeding order (`graph.input_names`); feed.py, mixup.py and the fault path write and
read the arrays under these names. What each input means: the table in graph.py. RandAugment's
inputs are declared in randaugment.py (`_TREE_FIELDS`, `_BRANCHLESS_FIELDS`, `_SHARED_FIELDS`).
"""
from __future__ import annotations

JPG, SIZE, WINDOW, CROP_START, CROP_END, IMG = "jpg", "size", "window", "crop_start", "crop_end", "img"
MIX_LAM, MIX_PERM, MIX_IDS, MIX_ANCHORS, MIX_SHAPES, MIX_KIND = (
    "mix_lam", "mix_perm", "mix_ids", "mix_anchors", "mix_shapes", "mix_kind")

# name -> (nvidia.dali.types element type, dimensions per sample)
SPECS: dict[str, tuple[str, int]] = {
    JPG: ("UINT8", 1), SIZE: ("FLOAT", 1), WINDOW: ("FLOAT", 1), CROP_START: ("FLOAT", 1), CROP_END: ("FLOAT", 1),
    IMG: ("UINT8", 3), MIX_LAM: ("FLOAT", 0), MIX_PERM: ("INT32", 0), MIX_IDS: ("INT32", 1),
    MIX_ANCHORS: ("INT32", 2), MIX_SHAPES: ("INT32", 2), MIX_KIND: ("INT32", 0),
}
LAYOUTS = {IMG: "HWC"}  # inputs whose tensors carry a layout (the Feeder sets it; DALI's ops check it)


def mix_names(branchless: bool) -> list[str]:
    """The mix stage's inputs (`ops.mix` / `ops.mix_branchless`), in feeding order; the tree also reads the kind."""
    return [MIX_LAM, MIX_PERM, MIX_IDS, MIX_ANCHORS, MIX_SHAPES] + ([] if branchless else [MIX_KIND])
