#!/usr/bin/env bash
# Collect the wheels of gpu/requirements.txt for an air-gapped CUDA machine (Python 3.12, x86_64) and pack them,
# unzipped into one folder, as gpu/site.tar.xz (~25 MB). On the GPU machine:
#   mkdir -p /tmp/site && tar -xJf gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/wheels" -r requirements.txt
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
# not needed to train: unsloth's Studio app, bitsandbytes builds for other CUDA/ROCm/XPU versions, MLflow's web UI
rm -rf "$work/site/studio" "$work/site/mlflow/server/js"
find "$work/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
tar -cJf site.tar.xz -C "$work/site" .
ls -la site.tar.xz
