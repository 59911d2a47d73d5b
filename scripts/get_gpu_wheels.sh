#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the GPU machine, which has torch, torchvision, timm, transformers,
# peft, safetensors, regex and huggingface_hub but not open_clip_torch, its ftfy, or ftfy's wcwidth. Downloads
# them (pure-Python wheels, no dependencies resolved) into .whl/ (git-ignored; carried by the device call), at
# the versions this checkout's .venv uses, else the newest. About 1.6 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
venv_py=.venv/bin/python
mkdir -p .whl
for pkg in open_clip_torch ftfy wcwidth; do
  version=""
  if [ -x "$venv_py" ]; then
    version=$("$venv_py" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null || true)
  fi
  rm -f .whl/"$pkg"-*.whl  # one version of each: two would stop the install there
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl "$pkg${version:+==$version}"
done
ls -l .whl
