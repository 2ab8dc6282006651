"""The data loader: a DALI pipeline over WebDataset shards whose stage (image size,
RandAugment magnitude, mixup/CutMix) changes at run time without a rebuild.

    from loaders import Loader, StageParams

Nothing here imports `model/` or `train/`: the loader serves any ConvNet.
See docs/loader.md.
"""
from loaders.loader import Loader
from loaders.params import StageParams
from loaders.reader import LoaderError

__all__ = ["Loader", "LoaderError", "StageParams"]
