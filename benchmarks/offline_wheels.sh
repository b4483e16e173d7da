#!/usr/bin/env bash
# Wheels for a GPU node without a package index (CPython 3.12, x86-64, an image that already holds torch,
# triton, transformers, peft, einops, numpy and PyYAML): what the benchmarks and the GPU tests import beyond it,
# at the versions they were run with. Two folders, so a run carries only what it needs:
#   CORE (default .whl):      deepspeed (pure Python: its ops compile on the node) and its needs, diffusers,
#                             omegaconf, webdataset, braceexpand (train_step.py, pytest -m gpu)
#   DATA (default .whl-data): av, decord, isal (data_loader.py; ~50 MB)
#   bash benchmarks/offline_wheels.sh [CORE [DATA]]
#   bash benchmarks/offline_wheels.sh fa4    FlashAttention-4 and the CuTe DSL (.fa4a, .fa4b; see below)
# On the node:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site CORE/*.whl [DATA/*.whl]
#   export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
CORE=${1:-.whl}
[[ $CORE == fa4 ]] && CORE=.whl
DATA=${2:-.whl-data}
mkdir -p "$CORE" "$DATA"
get() {  # get DIR PACKAGE==VERSION...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 -d "$dir" "$@"
}
if [[ ${1:-} == fa4 ]]; then
  # FlashAttention-4 for a node reached through a 64 MiB transfer limit: its wheels in .fa4b, and the 92 MB CUDA 13
  # library wheel of the CuTe DSL as an xz tar cut in two parts (.fa4a/, .fa4b/), sent in two calls. On the node:
  #   cat PART_A .fa4b/libs.part.ab > libs.tar.xz
  #   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .fa4b/*.whl
  #   python3 -c "import tarfile; tarfile.open('libs.tar.xz').extractall('/tmp/site')"
  #   export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p .fa4a .fa4b "$tmp/libs"
  get .fa4b flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
  get "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  (cd "$tmp/libs" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
  tar -C "$tmp/libs" -cf - . | xz -9e -T1 >"$tmp/libs.tar.xz"
  split -n 2 "$tmp/libs.tar.xz" "$tmp/libs.part."  # two halves, whatever the size
  mv "$tmp/libs.part.aa" .fa4a/ && mv "$tmp/libs.part.ab" .fa4b/
  du -sh .fa4a .fa4b
  exit 0
fi
get "$CORE" diffusers==0.42.1 omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 msgpack==1.2.4 \
  py-cpuinfo==9.0.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  nvidia-ml-py==13.615.71
python3 -m pip wheel -q --no-deps -w "$CORE" deepspeed==0.19.8
get "$DATA" av==18.1.0 decord==0.6.0 isal==1.9.1
du -sh "$CORE" "$DATA"
