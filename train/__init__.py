"""The trainer: progressive learning with adaptive regularization (EfficientNetV2, Algorithm 1), resumable to the bit.

    python -m train --data DEST --model efficientnetv2_s        # or `pipeline train ...`
    torchrun --nproc-per-node 8 -m train --config run.yaml

Modules: `config` (the typed config tree), `schedule` (stage sizes and
regularization; Table 6 presets), `optim` (TF RMSProp, LR schedule), `ema`,
`checkpoint`, `models` (any ConvNet, head replacement), `losses`,
`distributed`, `telemetry`, `build` (config -> objects), `loop` (the loop),
`demo` (the short CPU run of `make demo`).
"""
