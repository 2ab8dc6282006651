#!/usr/bin/env bash
# Build docker/Dockerfile with buildah on a Debian 12 base (no Docker engine, no
# GPU, no registry but the package registries), then run inside the image:
# `pipeline --version` (it must report the C re-encoder), build-shards and
# verify-shards on JPEG photos, and `python -m stagewise.train.demo` (its own
# build, verify and a short CPU training). Prints the image size and the build
# time. Too long for `make test` (docs/scale-out.md has the measured times):
#
#   docker/check-image.sh          (as root; or `make image-check`)
#
# Environment:
#   WHEELS    a folder holding a CPU torch wheel for Debian 12's Python 3.11
#             (torch-X+cpu-cp311-*.whl), mounted into the build (default
#             /opt/wheels). Without one the build installs PyPI's torch, the
#             CUDA build: several GB more, and no faster on a CPU.
#   CACHE     where the Debian base's rootfs is kept (default
#             /var/cache/stagewise-image).
#   DEBIAN_MIRROR  default: the first one in /etc/apt/sources.list(.d).
# Every run builds from the cached Debian base: no --layers, since vfs storage
# keeps a full copy of the filesystem for every cached step (2-3 GB each after
# torch: one build with --layers took 40 GB of disk). The previous image is
# removed after each build.
set -euo pipefail

step=setup
trap 'echo "check-image: FAILED in step \"$step\" (exit $?)" >&2' ERR

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
suite=bookworm
cache=${CACHE:-/var/cache/stagewise-image}
rootfs_tar=$cache/debian-$suite-minbase.tar
base=localhost/stagewise-base:debian-$suite
tag=localhost/stagewise:cpu-check
# vfs: overlay needs kernel support that a nested, unprivileged sandbox may
# lack; chroot isolation: no user namespaces or runc needed.
ba=(buildah --storage-driver vfs)
# This workplace's network only validates against the host's CA bundle
# (without it pip in the build finds no versions at all); elsewhere it is the
# same bundle the image would have.
ca=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro

step=tools
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq buildah debootstrap
fi

step="debian base"
if ! "${ba[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    if [[ ! -f $rootfs_tar ]]; then
        mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}')}
        mirror=${mirror:-$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)}
        mkdir -p "$cache"
        tmp=$(mktemp -d "$cache/rootfs.XXXXXX")
        # ca-certificates comes with the base so that the Dockerfile's install
        # of it is a no-op here: it would rewrite the bundle mounted read-only.
        debootstrap --variant=minbase --include=ca-certificates "$suite" "$tmp" "$mirror"
        tar --numeric-owner -C "$tmp" -cf "$rootfs_tar.part" .
        mv "$rootfs_tar.part" "$rootfs_tar"
        rm -rf "$tmp"
    fi
    c=$("${ba[@]}" from scratch)
    tar --numeric-owner -C "$("${ba[@]}" mount "$c")" -xf "$rootfs_tar"
    "${ba[@]}" umount "$c"
    "${ba[@]}" commit --rm "$c" "$base"
fi

step=build
build_args=(--build-arg "BASE_IMAGE=$base")
mounts=(-v "$ca")
wheels=${WHEELS:-/opt/wheels}
torch_wheel=$(compgen -G "$wheels/torch-*+cpu-cp311-*.whl" | sort -V | tail -n 1 || true)
if [[ -n $torch_wheel ]]; then
    torch=$(basename "$torch_wheel" | cut -d- -f2)  # e.g. 2.13.0+cpu
    IFS=. read -r major minor patch <<<"${torch%+*}"
    # torchvision 0.(M+15).P is the release built for torch 2.M.P (its wheel
    # pins torch==2.M.P, which a +cpu local version satisfies).
    [[ $major == 2 ]] || { echo "unexpected torch version $torch" >&2; exit 1; }
    build_args+=(--build-arg "TORCH_VERSION=$torch" --build-arg "TORCHVISION_VERSION=0.$((minor + 15)).$patch"
                 --build-arg "PIP_FIND_LINKS=/wheels")
    mounts+=(-v "$wheels:/wheels:ro")
    echo "check-image: torch $torch from $torch_wheel"
else
    echo "check-image: no CPU torch wheel in $wheels: PyPI's torch (the CUDA build)"
fi
# --format docker: the OCI format has no SHELL, and buildah would run RUN
# lines with /bin/sh, without pipefail.
start=$(date +%s)
nice -n 10 "${ba[@]}" bud --format docker --isolation chroot --pull=false \
    --ignorefile "$repo/docker/Dockerfile.dockerignore" "${mounts[@]}" "${build_args[@]}" \
    -f "$repo/docker/Dockerfile" -t "$tag" "$repo"
build_s=$(($(date +%s) - start))
step="remove the previous image"
"${ba[@]}" rmi --prune >/dev/null

step="start a container"

c=$("${ba[@]}" from --pull=never --isolation chroot "$tag")
trap '"${ba[@]}" rm "$c" >/dev/null' EXIT
run() { "${ba[@]}" run "$c" -- "$@"; }

step="pipeline --version"
version=$(run pipeline --version)
echo "$version"
grep -q 'YCbCr planes in C' <<<"$version" || { echo "the C re-encoder is not active" >&2; false; }
run python -c "from stagewise.loaders import hostdecode; assert hostdecode.AVAILABLE, 'no _cropdecode'"

# The demo's digits and the photos below ship inside scikit-learn, which the
# image leaves out (pyproject's bench extra): into this throwaway container only.
step="install scikit-learn"
"${ba[@]}" run --user root -v "$ca" "$c" -- pip install -q "scikit-learn>=1.3"

# Photos larger than --max-side, so that every one is re-encoded, in C.
step="photos"
run python -m stagewise.benchmarks.datasets crops check/photos --count 40 --classes 4 --size 500x375
step="build-shards"
run pipeline build-shards check/photos check/shards --layout folder --max-side 256 \
    --holdout 8 --holdout-split val --workers 2 --no-progress
step="verify-shards"
run pipeline verify-shards check/shards

step="demo training"
start=$(date +%s)
run python -m stagewise.train.demo --root check/demo
demo_s=$(($(date +%s) - start))

step=report
size=$("${ba[@]}" images --format '{{.Size}}' "$tag")
echo "check-image: OK. $tag: $size uncompressed; build ${build_s} s (nice -n 10, $(nproc) cores); demo ${demo_s} s"
