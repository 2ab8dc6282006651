"""The data loader: a DALI pipeline over WebDataset shards whose stage (image size,
RandAugment magnitude, mixup/CutMix) changes at run time without a rebuild.

    from stagewise.loaders import Loader, StageParams, AugmentSpec, ReadSpec, EngineSpec

Nothing here imports `model/` or `train/`: the loader serves any ConvNet.
See docs/loader.md.
"""
from stagewise.loaders.loader import Loader
from stagewise.loaders.params import StageParams
from stagewise.loaders.randaugment import RandAugmentConfig
from stagewise.loaders.shard_stream import LoaderError
from stagewise.loaders.spec import AugmentSpec, EngineSpec, ReadSpec

__all__ = ["AugmentSpec", "EngineSpec", "Loader", "LoaderError", "RandAugmentConfig", "ReadSpec", "StageParams"]
