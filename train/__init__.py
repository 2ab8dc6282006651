"""The trainer: progressive learning with adaptive regularization (EfficientNetV2, Algorithm 1), resumable to the bit.

    python -m stagewise.train --data DEST --model efficientnetv2_s        # or `pipeline train ...`
    torchrun --nproc-per-node 8 -m stagewise.train --config run.yaml

Modules: `loop` (setup, train_one_epoch, evaluate: the loop), `config` (the typed
config tree), `schedule` (stage sizes and regularization; presets from the
variant table, where Table 6 is), `data` (batch, eval size and loaders from the
config), `optim` (TF RMSProp, LR schedule), `ema`, `checkpoint`, `models` (any
ConvNet, head replacement), `losses`, `distributed`, `telemetry`, `cli` and
`schedule_cli` (the `train` and `schedule` commands), `demo` (`make demo`).
"""
