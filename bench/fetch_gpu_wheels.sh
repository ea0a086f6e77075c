#!/usr/bin/env bash
# Run on a machine WITH PyPI access (and the sftune assets: `make assets`), before going to a GPU machine
# without internet. Fills bench/wheels/ (git-ignored, never committed) with:
#   - Linux x86_64 wheels of everything bench/gpu_check.sh installs: CUDA torch, transformers, peft, datasets,
#     accelerate, safetensors, trl 1.16.0, liger-kernel, torch-optimi (and their dependencies), setuptools for the editable
#     install of sftune;
#   - bench/wheels/inputs/: SmolLM2's config, tokenizer and chat template and 2,000 chit-chat conversations.
# Then copy the whole repository (with bench/wheels/) to the GPU machine and run bench/gpu_check.sh there.
#
#   bench/fetch_gpu_wheels.sh                 # wheels for the local Python version
#   PYVER=3.12 bench/fetch_gpu_wheels.sh      # for another Python on the GPU machine
#   TORCH=torch==2.8.0 bench/fetch_gpu_wheels.sh   # match a CUDA torch the GPU machine already has
# Size: about 4 GB (torch's CUDA libraries are most of it; peft, accelerate and trl depend on torch, so it is
# always downloaded; gpu_check.sh installs it only if the machine's own torch does not satisfy the pins).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
TORCH=${TORCH:-torch==2.13.0}
DEST=bench/wheels
mkdir -p "$DEST"
# sftune's own dependencies, read from pyproject.toml (Python 3.11+: tomllib; torch replaced by $TORCH), then the benchmark's
mapfile -t packages < <("$PY" -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("torch")))')
packages=("$TORCH" "${packages[@]}" "trl==1.16.0" "liger-kernel" "torch-optimi" "setuptools>=68" "wheel")
# --platform/--python-version fetch Linux x86_64 wheels whatever this machine is; PyPI's default torch for
# Linux x86_64 is the CUDA build, which is what the GPU machine needs.
"$PY" -m pip download --dest "$DEST" --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any "${packages[@]}"
"$PY" bench/compare_trl.py --export-inputs "$DEST/inputs"
du -sh "$DEST"
