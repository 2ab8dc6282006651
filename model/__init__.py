"""EfficientNetV2 (Tan & Le 2021) and EfficientNet (Tan & Le 2019) in compact PyTorch.

    from stagewise.model import create_model, list_models, get_variant
    net = create_model("efficientnetv2_s", num_classes=1000)
    net.set_dropout(0.3); net.set_drop_path(0.2)

Parameter counts equal the official checkpoints' (see docs/model.md).
"""

from stagewise.model.net import DEFAULT_DROP_PATH_RATE, EfficientNet, create_model
from stagewise.model.variants import BlockGroup, Variant, get_variant, list_models

__all__ = [
    "BlockGroup",
    "DEFAULT_DROP_PATH_RATE",
    "EfficientNet",
    "Variant",
    "create_model",
    "get_variant",
    "list_models",
]
