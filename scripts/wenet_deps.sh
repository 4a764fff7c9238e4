#!/usr/bin/env bash
# Installs into DIR the packages WeNet's code imports besides this project's .venv (torch
# 2.11.0, numpy, PyYAML, safetensors), so that WeNet's own scripts run with
# PYTHONPATH=DIR .venv/bin/python (scripts/make_wenet_fixture.py, scripts/wenet_train.py).
# .venv itself is left as it is. Needs PyPI; a few minutes (deepspeed is built from its
# sdist, without its CUDA ops).
#
#   bash scripts/wenet_deps.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:?usage: scripts/wenet_deps.sh DIR}")
if [ -e "$dir/.complete" ]; then exit 0; fi
pip=".venv/bin/pip"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
mkdir -p "$dir"
$pip install -q --target "$dir" --no-deps torchaudio==2.11.0 openai-whisper more-itertools
$pip install -q --target "$dir" librosa langid tensorboardX tqdm sentencepiece tiktoken
# wenet/utils/train_utils.py imports deepspeed.
$pip install -q --target "$build" wheel
DS_BUILD_OPS=0 PYTHONPATH="$build" PATH="$PWD/.venv/bin:$PATH" \
  $pip install -q --target "$dir" --no-deps --no-build-isolation \
  deepspeed hjson ninja psutil py-cpuinfo einops pydantic pydantic-core \
  annotated-types typing-inspection
# Copies of packages .venv already has would shadow its own.
rm -rf "$dir"/numpy "$dir"/numpy-* "$dir"/numpy.libs "$dir"/packaging "$dir"/packaging-* \
  "$dir"/typing_extensions* "$dir"/protobuf* "$dir"/google
touch "$dir/.complete"
