#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that scripts/gpu_check.sh installs on a bare CUDA machine
# that has torch: this package's dependencies and their own, without torch, its CUDA libraries and vLLM.
#   bash scripts/gpu_wheels.sh [WHEEL_DIR] [PYTHON_VERSION]       (default: wheels/, 3.11)
#   bash scripts/gpu_wheels.sh --list                              (print the requirements, download nothing)
# Copy WHEEL_DIR beside the checkout on the GPU machine, then: bash scripts/gpu_check.sh WHEEL_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
# The dependencies of pyproject.toml, less torch (the GPU machine has its CUDA build), plus DeepSpeed for ZeRO-2.
requirements() {
    python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["deepspeed"]:
    if re.match(r"torch\b", requirement) is None:
        print(requirement)
PY
}
if [[ "${1:-}" == "--list" ]]; then requirements; exit 0; fi
dir=${1:-wheels}
python_version=${2:-3.11}
mkdir -p "$dir"
mapfile -t packages < <(requirements)
# Binary wheels for the GPU machine's platform; torch and everything CUDA is left out (it is there already).
python3 -m pip download --dest "$dir" --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --python-version "$python_version" "${packages[@]}" \
    --no-deps 2>&1 | tail -1
# Their dependencies, resolved against the same platform, less torch / nvidia-* / triton.
python3 -m pip download --dest "$dir.all" --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --python-version "$python_version" "${packages[@]}" 2>&1 | tail -1
find "$dir.all" -name '*.whl' ! -name 'torch-*' ! -name 'nvidia_*' ! -name 'triton-*' -exec mv {} "$dir"/ \;
rm -rf "$dir.all"
size_mb=$(du -sm "$dir" | cut -f1)
echo "gpu_wheels: $(ls "$dir" | wc -l) wheels, ${size_mb} MB in $dir"
