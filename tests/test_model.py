"""Tests for model/: reference parameter counts, architecture tables, FLOPs, run-time regularization, speed paths.

Driven by the variant table (`list_models()`). Reference counts were read from
timm 1.0.31's ports of the official checkpoints (`tf_efficientnetv2_*`,
`tf_efficientnet_b*`, `pretrained=False`, 1000 classes) and are hard-coded.
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stagewise.model import EfficientNet, create_model, get_variant, list_models
from stagewise.model.layers import BN_EPS, BN_MOMENTUM, Conv2dSame, MBConv

# Parameters at 1000 classes of the official checkpoints, as ported by timm.
REFERENCE_PARAMS = {
    "efficientnetv2_s": 21_458_488,  # paper Table 7 says 24M; the checkpoint has 21.46M
    "efficientnetv2_m": 54_139_356,
    "efficientnetv2_l": 118_515_272,
    "efficientnetv2_xl": 208_119_808,
    "efficientnetv2_b0": 7_139_704,
    "efficientnetv2_b1": 8_141_052,
    "efficientnetv2_b2": 10_096_086,
    "efficientnetv2_b3": 14_358_406,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Inputs here are tiny, so a second thread gains nothing, and on a loaded
    machine OpenMP barriers across oversubscribed cores cost 5-10x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- The table -----------------------------------------------------------------

def test_every_variant_has_a_reference_count():
    assert list_models() == list(REFERENCE_PARAMS)


def test_rows_are_frozen_and_unknown_names_are_refused():
    row = get_variant("efficientnetv2_s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.dropout = 0.9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.groups[0].repeats = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="efficientnetv2_s"):
        create_model("efficientnetv2_q")


def test_v2_s_is_paper_table_4():
    v = get_variant("efficientnetv2_s")
    assert v.stem_ch == 24 and v.head_ch == 1280
    got = [(s.block, s.expand, s.kernel, s.se_ratio, s.stride, s.out_ch, s.repeats) for s in v.groups]
    assert got == [
        ("fused", 1, 3, 0.0, 1, 24, 2),
        ("fused", 4, 3, 0.0, 2, 48, 4),
        ("fused", 4, 3, 0.0, 2, 64, 4),
        ("mbconv", 4, 3, 0.25, 2, 128, 6),
        ("mbconv", 6, 3, 0.25, 1, 160, 9),
        ("mbconv", 6, 3, 0.25, 2, 256, 15),
    ]


def test_compound_scaling_is_computed_from_b0():
    # EfficientNet-B7 (width 2.0, depth 3.1) as in the official checkpoint.
    b7 = get_variant("efficientnet_b7")
    assert (b7.stem_ch, b7.head_ch) == (64, 2560)
    assert [s.repeats for s in b7.groups] == [4, 7, 7, 10, 10, 13, 4]
    assert [s.out_ch for s in b7.groups] == [32, 48, 80, 160, 224, 384, 640]
    # V2-B3 (width 1.2, depth 1.4): V2's rounding keeps 16*1.2 -> 16 (V1's 10% rule would give 24).
    b3 = get_variant("efficientnetv2_b3")
    assert (b3.stem_ch, b3.head_ch) == (40, 1536)
    assert [s.out_ch for s in b3.groups] == [16, 40, 56, 112, 136, 232]
    assert [s.repeats for s in b3.groups] == [2, 3, 3, 5, 7, 12]


def test_training_targets_follow_paper_table_6():
    rows = {n: get_variant(n) for n in ("efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l")}
    got = {n: (v.train_size, v.randaug_magnitude, v.mixup_alpha, v.dropout, v.eval_size, v.eval_crop_pct)
           for n, v in rows.items()}
    assert got == {
        "efficientnetv2_s": (300, 15, 0.0, 0.3, 384, 1.0),
        "efficientnetv2_m": (380, 20, 0.2, 0.4, 480, 1.0),
        "efficientnetv2_l": (380, 25, 0.4, 0.5, 480, 1.0),
    }
    v1 = [get_variant(f"efficientnet_b{i}") for i in range(8)]
    assert [v.eval_size for v in v1] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert [v.dropout for v in v1] == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5]
    assert v1[0].eval_crop_pct == pytest.approx(0.875)
    for name in list_models():
        v = get_variant(name)
        assert v.train_size <= v.eval_size and 0 < v.eval_crop_pct <= 1 and 0 <= v.dropout < 1


# --- Every variant: reference count, forward, backward ---------------------------

@pytest.mark.parametrize("name", list_models())
def test_variant_matches_reference_and_trains(name):
    torch.manual_seed(0)
    model = create_model(name, drop_path_rate=0.0)
    assert n_params(model) == REFERENCE_PARAMS[name]  # the issue allows 0.01M; we match exactly
    model.train()
    # 64 px keeps the last stage at 2x2, so train-mode BN sees 8 values per channel.
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    no_grad = [k for k, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_num_classes_changes_only_the_classifier():
    a, b = create_model("efficientnetv2_b0", num_classes=1000), create_model("efficientnetv2_b0", num_classes=10)
    assert n_params(a) - n_params(b) == (1000 - 10) * (1280 + 1)
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_flops_v2_s_at_384_match_official():
    with torch.device("meta"):
        model = create_model("efficientnetv2_s").eval()
        x = torch.empty(1, 3, 384, 384)
    with FlopCounterMode(display=False) as counter:
        model(x)
    macs = counter.get_total_flops() / 2
    assert macs == pytest.approx(8.4e9, rel=0.05)


def test_init_follows_the_reference():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_s")
    conv = model.blocks[-1].expand_conv.conv  # 1x1, 256 -> 1536
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 1536), rel=0.02)
    dw = model.blocks[-1].dw.conv  # depthwise 3x3: fan_out = 9 (TF's depth multiplier 1)
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.02)
    bound = 1 / math.sqrt(1000)
    w = model.classifier.weight
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert model.classifier.bias.abs().sum() == 0
    se = model.blocks[-1].se
    assert se.reduce.bias.abs().sum() == 0 and se.expand.bias.abs().sum() == 0
    # SE width is 0.25 of the block's input channels (256), not of the expanded 1536.
    assert se.reduce.out_channels == 64
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == BN_EPS == 1e-3 and m.momentum == BN_MOMENTUM == 0.01 for m in bns)
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) > 100


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = create_model("efficientnetv2_b0", num_classes=10)
    a.train()
    a(torch.randn(4, 3, 32, 32))  # move the BN running statistics off their init
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = create_model("efficientnetv2_b0", num_classes=10)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    a.eval(), b.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --- Padding ------------------------------------------------------------------------

@pytest.mark.parametrize(("kernel", "size", "pads"), [(3, 64, (0, 1)), (3, 65, (1, 1)), (5, 64, (1, 2)), (5, 65, (2, 2))])
def test_conv2d_same_is_tensorflow_same(kernel, size, pads):
    # TF SAME, stride 2: total pad max((ceil(i/2)-1)*2 + k - i, 0), the odd pixel at right/bottom.
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, kernel, 2, padding=0, bias=False)
    x = torch.randn(1, 4, size, size)
    expected = F.conv2d(F.pad(x, [pads[0], pads[1], pads[0], pads[1]]), conv.weight, stride=2)
    got = conv(x)
    assert got.shape[-1] == math.ceil(size / 2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["efficientnetv2_b0", "efficientnet_b0"])
def test_tf_same_padding_keeps_weights_changes_alignment(name):
    torch.manual_seed(0)
    sym = create_model(name, num_classes=10).eval()
    same = create_model(name, num_classes=10, tf_same_padding=True).eval()
    assert n_params(same) == n_params(sym) == REFERENCE_PARAMS[name] - 990 * (sym.num_features + 1)
    same.load_state_dict(sym.state_dict(), strict=True)  # same names and shapes
    assert sum(isinstance(m, Conv2dSame) for m in same.modules()) == 5  # stem + 4 strided stages
    with torch.no_grad():
        for size in (64, 65):
            x = torch.randn(2, 3, size, size)
            assert same.forward_features(x).shape == sym.forward_features(x).shape
        x = torch.randn(2, 3, 64, 64)
        assert not torch.allclose(same(x), sym(x))  # even sizes: TF pads right/bottom only


# --- Run-time regularization -----------------------------------------------------

def _classifier_inputs(model: EfficientNet, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_set_dropout_is_used_in_training():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_b0", num_classes=10, dropout=0.0, drop_path_rate=0.0).train()
    x = torch.randn(8, 3, 32, 32)
    clean = _classifier_inputs(model, x)  # train-mode BN uses batch statistics: same features each call
    assert (clean == 0).float().mean() < 0.01
    for p in (0.2, 0.6):
        model.set_dropout(p)
        assert model.dropout_rate == p
        dropped = _classifier_inputs(model, x)
        zero = dropped == 0
        assert zero.float().mean().item() == pytest.approx(p, abs=0.03)  # 10,240 features
        torch.testing.assert_close(dropped[~zero], clean[~zero] / (1 - p))
    model.eval()
    assert torch.equal(_classifier_inputs(model, x), _classifier_inputs(model, x))
    assert (_classifier_inputs(model, x) == 0).float().mean() < 0.01


def _dropped_fraction(model: EfficientNet, block: nn.Module, x: torch.Tensor) -> float:
    """Fraction of samples whose residual branch `block` dropped: its output equals its input."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = block.register_forward_hook(lambda _m, args, out: seen.append((args[0].clone(), out.clone())))
    with torch.no_grad():
        model(x)
    handle.remove()
    inp, out = seen[0]
    return (inp == out).flatten(1).all(1).float().mean().item()


def test_set_drop_path_is_used_in_training():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_b0", num_classes=10, drop_path_rate=0.0).train()
    n = len(model.blocks)
    last = model.blocks[-1]
    assert isinstance(last, MBConv) and last.has_residual
    x = torch.randn(512, 3, 32, 32)
    assert _dropped_fraction(model, last, x) == 0.0
    for rate in (0.2, 0.6):
        model.set_drop_path(rate)
        assert model.drop_path_rate == rate
        # Linear over blocks as in the official code: block i of n drops with rate * i / n.
        assert [b.drop_path_rate for b in model.blocks] == pytest.approx([rate * i / n for i in range(n)])
        assert _dropped_fraction(model, last, x) == pytest.approx(rate * (n - 1) / n, abs=0.07)  # ~3.5 sigma
    model.eval()
    assert _dropped_fraction(model, last, x) == 0.0


def test_eval_is_deterministic_and_ignores_rates():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_b0", num_classes=10, dropout=0.0, drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        model.set_dropout(0.5)
        model.set_drop_path(0.5)
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # training is stochastic at these rates


def test_defaults_come_from_the_table():
    model = create_model("efficientnetv2_s")
    assert model.dropout_rate == get_variant("efficientnetv2_s").dropout == 0.3
    assert model.drop_path_rate == 0.2  # survival probability 0.8 (paper §5.1)
    assert model.blocks[0].drop_path_rate == 0.0
    assert model.blocks[-1].drop_path_rate == pytest.approx(0.2 * 39 / 40)
    with pytest.raises(ValueError):
        model.set_dropout(1.0)
    with pytest.raises(ValueError):
        model.set_drop_path(-0.1)


# --- Speed paths ---------------------------------------------------------------------

def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_b0", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model.forward_features(x)
        assert ref.is_contiguous(memory_format=torch.channels_last)  # no hidden layout conversions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_features(x)
    assert low.dtype == torch.bfloat16
    cos = F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_compiled_forward_matches_eager():
    torch.manual_seed(0)
    model = create_model("efficientnetv2_b0", num_classes=1000)
    x = torch.randn(2, 3, 64, 64)
    # Calibrate BN on x (momentum None = cumulative average, one batch = its
    # statistics) so eval activations keep unit scale; with fresh running
    # statistics they shrink to ~1e-3 and any tolerance would be vacuous.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    model.eval()

    def features_and_logits(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = model.forward_features(inp)
        return feats, model.forward_head(feats)

    compiled = torch.compile(features_and_logits, fullgraph=True)  # fullgraph: any graph break fails
    with torch.no_grad():
        (eager_feat, eager_out), (comp_feat, comp_out) = features_and_logits(x), compiled(x)
    assert eager_feat.abs().mean() > 0.1  # not a comparison of near-zero tensors
    for got, want in ((comp_feat, eager_feat), (comp_out, eager_out)):
        # Relative L2 error: fp32 reassociation inside fused kernels gives ~1e-5.
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-3
