"""The trainer's parts: TF RMSProp, LR schedule, EMA, losses (multi-label too), checkpoints, RNG state, new heads."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stagewise.model import create_model
from stagewise.shards.store import url_exists
from stagewise.train import checkpoint
from stagewise.train.ema import EMA
from stagewise.train.losses import loss_fn, soft_cross_entropy, topk_correct
from stagewise.train.models import build_model, classifier_name, load_backbone, zero_head
from stagewise.train.optim import RMSpropTF, learning_rate, param_groups, scaled_lr


def test_rmsprop_has_tf_semantics():
    torch.manual_seed(0)
    w0 = torch.randn(5)
    grads = [torch.randn(5) for _ in range(4)]
    lr, rho, mom_c, eps, wd = 0.05, 0.9, 0.9, 1e-3, 0.01
    p = nn.Parameter(w0.clone())
    opt = RMSpropTF([p], lr=lr, decay=rho, momentum=mom_c, eps=eps, weight_decay=wd)
    # reference, element by element, as tf.compat.v1.train.RMSPropOptimizer: ms starts at 1, eps inside the sqrt
    w, ms, mom = w0.tolist(), [1.0] * 5, [0.0] * 5
    for g in grads:
        p.grad = g.clone()
        opt.step()
        for j in range(5):
            gj = g[j].item() + wd * w[j]
            ms[j] = rho * ms[j] + (1 - rho) * gj * gj
            mom[j] = mom_c * mom[j] + lr * gj / math.sqrt(ms[j] + eps)
            w[j] -= mom[j]
    assert p.detach().tolist() == pytest.approx(w, rel=1e-5, abs=1e-6)
    # torch's RMSprop (ms from 0, eps outside the sqrt) is a different optimizer
    q = nn.Parameter(w0.clone())
    ref = torch.optim.RMSprop([q], lr=lr, alpha=rho, momentum=mom_c, eps=eps, weight_decay=wd)
    for g in grads:
        q.grad = g.clone()
        ref.step()
    assert not torch.allclose(p.detach(), q.detach(), atol=1e-3)


def test_weight_decay_skips_bn_and_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(net, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}


def test_learning_rate_schedule():
    peak = scaled_lr(0.256, 4096, 1024)
    assert peak == pytest.approx(0.064)  # linear scaling, 0.256 per 4096
    kw = dict(peak=peak, warmup_epochs=5, total_epochs=350)
    assert learning_rate(0.0, decay="exponential", **kw) == 0.0
    assert learning_rate(2.5, decay="exponential", **kw) == pytest.approx(peak / 2)  # linear warm-up
    assert learning_rate(5.0, decay="exponential", **kw) == pytest.approx(peak * 0.97 ** 2)  # floor(5 / 2.4) = 2
    assert learning_rate(7.19, decay="exponential", **kw) == pytest.approx(peak * 0.97 ** 2)  # staircase
    assert learning_rate(7.21, decay="exponential", **kw) == pytest.approx(peak * 0.97 ** 3)
    assert learning_rate(175.0, decay="cosine", **kw) == pytest.approx(peak / 2)
    assert learning_rate(350.0, decay="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown lr decay 'linear'"):
        learning_rate(10.0, decay="linear", **kw)


def test_ema_follows_tf_warmup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(net, 0.9999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10**7) == 0.9999
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    for t in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        net.train()
        net(torch.randn(4, 3))  # moves BN running stats and the batch counter
        ema.update(net)
        d = min(0.9999, (1 + t) / (10 + t))
        for k, v in net.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.float(), expected[k].float(), atol=1e-6), k
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 3
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_loss_hard_labels_are_smoothed_here_soft_targets_are_not():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert loss_fn(logits, labels, 0.1) == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    soft = 0.9 * F.one_hot(labels, 10).float() + 0.01  # what the loader emits after smoothing 0.1 itself
    expected = -(soft * F.log_softmax(logits, 1)).sum(1).mean()
    assert loss_fn(logits, soft, 0.1) == pytest.approx(expected.item())  # not smoothed a second time
    with pytest.raises(ValueError, match=r"soft targets must be \[N, 10\]"):
        loss_fn(logits, soft[:, :5], 0.1)


def test_multilabel_loss_is_softmax_ce_on_normalized_multi_hot():
    targets = torch.zeros(3, 8)  # multi-hot rows normalized to sum 1 (paper §5.2)
    targets[0, [1, 4]] = 1 / 2
    targets[1, 0] = 1.0
    targets[2, [2, 3, 7]] = 1 / 3
    logits = torch.randn(3, 8)
    logp = F.log_softmax(logits, 1)
    by_hand = -((logp[0, 1] + logp[0, 4]) / 2 + logp[1, 0] + (logp[2, 2] + logp[2, 3] + logp[2, 7]) / 3) / 3
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss_fn(logits, targets, 0.1).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the loss is lowest when probability mass is split evenly over a sample's labels
    even = torch.full((1, 8), -20.0)
    even[0, [1, 4]] = 0.0
    skewed = even.clone()
    skewed[0, 1] = 3.0
    assert soft_cross_entropy(even, targets[:1]) < soft_cross_entropy(skewed, targets[:1])


def test_topk_ignores_padding():
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [5, 0, 1]])
    top1, top2, n = topk_correct(logits, torch.tensor([0, 2, 2, -1]), ks=(1, 2))
    assert (top1.item(), top2.item(), n.item()) == (2, 3, 3)


def test_checkpoint_roundtrip_restores_weights_rng_and_config(tmp_path):
    url = str(tmp_path / "ck" / "last.pt")
    net = nn.Linear(3, 2)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.save(url, {"model": net.state_dict(), "rng": [checkpoint.rng_state()], "step": 5}, "a: 1\n")
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ck = checkpoint.load(url)
    assert ck["step"] == 5 and torch.equal(ck["model"]["weight"], net.weight.detach())
    checkpoint.set_rng_state(ck["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    assert (tmp_path / "ck" / "config.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.yaml", "last.pt"]  # no temporaries left
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt is not a readable checkpoint"):
        checkpoint.load(str(tmp_path / "junk.pt"))


_UNPICKLED: list[str] = []


def _record(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _Payload:
    """An object whose unpickling runs code (here, harmlessly, `_record`)."""

    def __reduce__(self):
        return (_record, ("code ran",))


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    url = str(tmp_path / "last.pt")
    checkpoint.save(url, {"model": {"w": torch.ones(3)}, "step": 5}, "a: 1\n")
    before = (tmp_path / "last.pt").read_bytes()

    def dies_midway(obj, f, *args, **kwargs):  # a process killed or a disk filled mid-write
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(url, {"model": {"w": torch.zeros(3)}, "step": 6}, "a: 2\n")
    assert (tmp_path / "last.pt").read_bytes() == before and checkpoint.load(url)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pt"]  # no temporary left behind
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"  # written after the checkpoint, so not reached


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    url = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Payload()}, url)  # plain pickle, as any tool could write
    _UNPICKLED.clear()
    with pytest.raises(ValueError, match="evil.pt is not a readable checkpoint"):
        checkpoint.load(str(url))
    assert _UNPICKLED == []  # refused before anything in it ran
    torch.load(url, weights_only=False)  # the same file, unpickled unsafely, does run it: the test can tell
    assert _UNPICKLED == ["code ran"]


def test_checkpoint_on_s3(s3_bucket):
    url = f"{s3_bucket}/run/last.pt"
    checkpoint.save(url, {"model": {"w": torch.arange(4.0)}}, "x: 2\n")
    assert torch.equal(checkpoint.load(url)["model"]["w"], torch.arange(4.0))
    assert url_exists(f"{s3_bucket}/run/config.yaml")


def test_finetune_replaces_only_the_head():
    torch.manual_seed(0)
    src = create_model("efficientnetv2_b0", num_classes=10)
    dst = create_model("efficientnetv2_b0", num_classes=4)
    fresh_head = dst.classifier.weight.detach().clone()
    replaced = load_backbone(dst, src.state_dict(), "src.pt")
    assert replaced == ["classifier.bias", "classifier.weight"]
    assert dst.classifier.out_features == 4 and torch.equal(dst.classifier.weight, fresh_head)
    assert torch.equal(dst.stem.conv.weight, src.stem.conv.weight)
    other = build_model("torchvision:resnet18", 4, drop_path_rate=0.0, tf_same_padding=False)
    assert classifier_name(other) == "fc"
    assert zero_head(other) == "fc" and not other.fc.weight.any() and not other.fc.bias.any()
    assert other.conv1.weight.any()
    with pytest.raises(ValueError, match="src.pt does not fit this model"):
        load_backbone(other, src.state_dict(), "src.pt")


@pytest.mark.parametrize("requested, device, cores, local_world, expected", [
    (3, "cpu", 16, 1, 3),  # an explicit value wins
    (0, "cpu", 2, 1, 1),  # 2 cores: one for torch, one for the loader
    (0, "cpu", 16, 1, 8),
    (0, "cpu", 16, 4, 2),  # torchrun --nproc-per-node 4 shares the node
    (0, "cpu", 2, 4, 1),  # never 0
    (0, "cuda", 16, 1, 0),  # 0 keeps torch's default on a GPU run
])
def test_auto_torch_threads(monkeypatch, requested, device, cores, local_world, expected):
    from stagewise.train import distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert distributed.torch_threads(requested, torch.device(device)) == expected
