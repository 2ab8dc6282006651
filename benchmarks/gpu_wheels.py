"""Prepare what the GPU check carries to a bare GPU machine: wheels in parts small enough to carry one per call.

The lent GPU machines start with Python 3.12, torch 2.11.0+cu130 and a wide scientific stack
(numpy, Pillow, torchvision 0.26, timm, scikit-learn, scikit-image, pytest, PyYAML, fsspec, tqdm,
...), and reach no network. This downloads (here, through pip) only the wheels that stack lacks,
for CPython 3.12 on manylinux x86_64, into a git-ignored folder, packs them, and splits the pack
into parts of at most 62 MiB, so that a part and the repository together stay under a call's
64 MiB:

    python -m stagewise.benchmarks.gpu_wheels            # -> .whl/parts/pack.tar.NN, .whl/parts/SHA256SUMS

Then each device call carries one part (and SHA256SUMS); a warm machine keeps what earlier calls
brought, and `bash benchmarks/gpu_check.sh` joins, checks and installs them (docs/benchmarks.md,
"GPU check").

The list is pinned (`WHEELS`): DALI 2.4.0 for CUDA 13 and what it requires (nvImageCodec with
nvJPEG; nvCOMP, which DALI pins; its small pure-Python helpers), and webdataset for bench-loader's
baseline. Everything is installed with --no-deps, so nothing asks pip to resolve against a network.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WHEELS = [  # (requirement, index URL or None for the default index)
    ("nvidia-dali-cuda130==2.4.0", None),
    ("nvidia-nvimgcodec-cu13==0.9.0.20", None),  # DALI 2.4 requires >=0.9,<0.10 (see NVIDIA/nvImageCodec#55)
    ("nvidia-nvjpeg==13.3.2.43", None),
    ("nvidia-libnvcomp-cu13==5.3.0.16", None),
    ("astunparse==1.6.3", None), ("gast==0.6.0", None), ("optree==0.17.0", None), ("nvtx==0.2.13", None),
    ("makefun==1.16.0", None), ("libcst==1.8.5", None),
    ("webdataset==1.0.2", None), ("braceexpand==0.1.7", None),
]
PART_MIB = 62  # + the repository (~1 MiB) < a call's 64 MiB


def download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for requirement, index in WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               PYTHON, "--implementation", "cp", *platforms, "-d", str(dest), requirement]
        if index:
            cmd += ["--index-url", index]
        print("+", requirement, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(dest.glob("*.whl"))


def pack(files: list[Path], root: Path, parts_dir: Path, part_mib: int) -> list[Path]:
    """One uncompressed tar (wheels are zip files already), cut into parts; SHA256SUMS covers the members."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("pack.tar.*"):
        old.unlink()
    sums = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root)}" for f in files]
    (root / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    tar_path = root / "pack.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(root / "SHA256SUMS", arcname="SHA256SUMS")
        for f in files:
            tar.add(f, arcname=str(f.relative_to(root)))
    limit = part_mib * 2**20
    parts = []
    with open(tar_path, "rb") as src:
        k = 0
        while chunk := src.read(limit):
            part = parts_dir / f"pack.tar.{k:02d}"
            part.write_bytes(chunk)
            parts.append(part)
            k += 1
    tar_path.unlink()
    (parts_dir / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in parts))
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagewise.benchmarks.gpu_wheels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".whl", help="git-ignored folder (default .whl, in .gitignore)")
    parser.add_argument("--part-mib", type=int, default=PART_MIB)
    args = parser.parse_args(argv)
    root = Path(args.dest)
    wheels = download(root / "wheels")
    parts = pack(wheels, root, root / "parts", args.part_mib)
    total = sum(p.stat().st_size for p in parts)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {len(parts)} part(s) of "
          f"<= {args.part_mib} MiB under {root / 'parts'}:")
    for p in parts:
        print(f"  {p}  {p.stat().st_size / 2**20:.1f} MiB")
    print("carry one part per device call (carry: [\"" + str(parts[0]) + "\"], ...), then run "
          "benchmarks/gpu_check.sh; see docs/benchmarks.md, 'GPU check'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
