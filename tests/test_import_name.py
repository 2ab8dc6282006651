"""One import name: stagewise lives beside a user's own train.py, model.py, loaders.py... and never picks them up.

A user's script folder comes first on sys.path. Each of these files there
raises when imported, so any import of a bare `train`, `model`, `loaders`,
`shards`, `pipeline` or `benchmarks`, ours or the library's, fails the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.test_train_loop import make_dataset

USER_FILES = ("train", "model", "loaders", "shards", "pipeline", "benchmarks")

USER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from stagewise.loaders import Loader, StageParams
    from stagewise.model import create_model
    from stagewise.train import config
    from stagewise.train.loop import train

    data = sys.argv[1]
    with Loader(data, split="train", batch_size=4, device="cpu",
                stage=StageParams(image_size=32, randaug_magnitude=5, mixup_alpha=0)) as loader:
        loader.set_epoch(0)
        images, labels = next(iter(loader))
    net = create_model("efficientnetv2_b0", num_classes=loader.num_classes)
    logits = net(images)
    cfg = config.parse(["--data", data, "--run-dir", sys.argv[2], "--model", "efficientnetv2_b0", "--run.device=cpu",
                        "--run.progress=false", "--run.tensorboard=false", "--run.plots=false", "--run.threads=1",
                        "--optim.batch_size=8", "--schedule.epochs=1", "--schedule.stages=1",
                        "--schedule.max_size=32", "--data.eval_size=32", "--model.channels_last=false"])
    result = train(cfg, print_config=False)
    print("user script:", tuple(images.shape), tuple(logits.shape), result["steps"], "steps")
""")


def test_a_users_train_py_and_model_py_do_not_shadow_stagewise(tmp_path):
    shards = make_dataset(tmp_path / "data")
    project = tmp_path / "project"
    project.mkdir()
    for name in USER_FILES:
        (project / f"{name}.py").write_text(f"raise ImportError('the own {name}.py of the user was imported')\n")
    (project / "my_training.py").write_text(USER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "my_training.py", shards, str(tmp_path / "run")], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "user script: (4, 3, 32, 32) (4, 4) 4 steps" in run.stdout
    # the commands, started from that folder too
    pipeline = os.path.join(os.path.dirname(sys.executable), "pipeline")
    for cmd in ([pipeline, "schedule", "--preset", "efficientnetv2_s"],
                [sys.executable, "-m", "stagewise.train", "--help"],
                [sys.executable, "-m", "stagewise.pipeline", "stats", shards]):
        done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "was imported" not in done.stderr, (cmd, done.stderr[-2000:])
