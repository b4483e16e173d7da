#!/usr/bin/env bash
# Wheels for a GPU node without a package index (CPython 3.12, x86-64, an image that already holds torch,
# triton, transformers, peft, einops, numpy and PyYAML): what the benchmarks and the GPU tests import beyond it,
# at the versions they were run with. Two folders, so a run carries only what it needs:
#   CORE (default .whl):      deepspeed (pure Python: its ops compile on the node) and its needs, diffusers,
#                             omegaconf, webdataset, braceexpand (train_step.py, pytest -m gpu)
#   DATA (default .whl-data): av, decord, isal (data_loader.py; ~50 MB)
#   bash benchmarks/offline_wheels.sh [CORE [DATA]]
# On the node:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site CORE/*.whl [DATA/*.whl]
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
CORE=${1:-.whl}
DATA=${2:-.whl-data}
mkdir -p "$CORE" "$DATA"
get() {  # get DIR PACKAGE==VERSION...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d "$dir" "$@"
}
get "$CORE" diffusers==0.42.1 omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 msgpack==1.2.4 \
  py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  nvidia-ml-py==13.615.71
python3 -m pip wheel -q --no-deps -w "$CORE" deepspeed==0.19.8
get "$DATA" av==18.1.0 decord==0.6.0 isal==1.9.1
du -sh "$CORE" "$DATA"
