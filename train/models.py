"""Which network to train, how stage regularization reaches it, and head replacement for fine-tuning.

`--model NAME` is any name in `model/` (EfficientNetV2 / EfficientNet), or
`torchvision:NAME` for any torchvision classifier (e.g. `torchvision:resnet152`,
the paper's Table 12). Dropout and stochastic depth are pushed only to models
that expose `set_dropout` / `set_drop_path`; others train without the dropout
ramp and the trainer says so once.
"""
from __future__ import annotations

import torch
from torch import nn

import difflib

from stagewise.model import create_model, get_variant, list_models
from stagewise.model.variants import Variant
from stagewise.train import checkpoint

TORCHVISION = "torchvision:"


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # classifiers only


def check_name(name: str) -> str | None:
    """None when `name` is a model this trainer builds, else the problem with the nearest names (torchvision's
    included: `resnet18` -> `torchvision:resnet18`)."""
    if name.startswith(TORCHVISION):
        arch, known = name[len(TORCHVISION):], _torchvision_names()
        if arch in known:
            return None
        near = [TORCHVISION + n for n in difflib.get_close_matches(arch, known, n=2)]
        what = f"unknown torchvision classifier {arch!r}"
    else:
        if name in list_models():
            return None
        names = list_models() + [TORCHVISION + n for n in _torchvision_names()]
        plain = {n[len(TORCHVISION):] if n.startswith(TORCHVISION) else n: n for n in reversed(names)}
        near = [plain[n] for n in difflib.get_close_matches(name, list(plain), n=2)]  # compare bare names
        what = f"unknown model {name!r}"
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    return f"model.name: {what}; {hint}(names: stagewise.model.list_models(), or torchvision:NAME)"


def build_model(name: str, num_classes: int, *, drop_path_rate: float, tf_same_padding: bool) -> nn.Module:
    """A freshly initialized model with `num_classes` outputs."""
    problem = check_name(name)
    if problem is not None:
        raise ValueError(problem)
    if name.startswith(TORCHVISION):
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION):], weights=None, num_classes=num_classes)
    return create_model(name, num_classes=num_classes, dropout=None, drop_path_rate=drop_path_rate,
                        tf_same_padding=tf_same_padding)


def variant_of(name: str) -> Variant | None:
    """The `model/` table row of `name`; None for torchvision models (ValueError for an unknown name)."""
    return None if name.startswith(TORCHVISION) else get_variant(name)


def supports_dropout(model: nn.Module) -> bool:
    return callable(getattr(model, "set_dropout", None))


def set_dropout(model: nn.Module, p: float) -> bool:
    """Push the stage's dropout to the model; False when the model has no `set_dropout`."""
    if not supports_dropout(model):
        return False
    model.set_dropout(p)
    return True


def classifier_name(model: nn.Module) -> str:
    """Module path of the last nn.Linear: `classifier` (model/), `fc` (ResNet), `classifier.1` (tv EfficientNet)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return last


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load `state` into `model` except the classifier, which keeps its fresh initialization.

    Returns the replaced classifier keys. Every other key must match in name
    and shape; a mismatch names the key and `source` (usually another model).
    """
    head = classifier_name(model) + "."
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = [k for k in own if not k.startswith(head) and k not in body]
    unexpected = [k for k in body if k not in own]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"(is it the same --model?)")
    for k, v in body.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    replaced = sorted(k for k in own if k.startswith(head))
    model.load_state_dict({**body, **{k: own[k] for k in replaced}}, strict=True)
    return replaced


def load_for_finetune(model: nn.Module, url: str) -> str:
    """Backbone from a checkpoint's EMA weights (official ft_init_ema) or plain weights; a fresh head.
    Returns the line to print."""
    ck = checkpoint.load(url)
    state = ck["ema"]["weights"] if ck.get("ema") else ck["model"]
    replaced = load_backbone(model, state, url)
    return f"fine-tuning from {url}: new classifier head ({', '.join(replaced)})"


def zero_head(model: nn.Module) -> str:
    """Zero the classifier's weight and bias, so training starts from uniform predictions; returns its name.

    The official dense initializer, uniform(+-1/sqrt(classes)), gives logits of
    several units for 10 classes (a first loss near 6 instead of ln 10): harmless
    over 350 epochs, a real cost in a 500-step run.
    """
    name = classifier_name(model)
    layer = model.get_submodule(name)
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return name


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set torch-convention momentum (new-stat weight) on every BatchNorm layer; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.momentum = momentum
    return len(layers)
