#!/usr/bin/env bash
# The whole GPU check in one device call (BENCHMARKS.md, "GPU check", has the exact `run` call):
#   bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_S [gpu_check.py options...]]
# Installs the wheels scripts/get_gpu_wheels.sh put in .whl/ (the GPU machine has torch, transformers and peft but
# not open_clip_torch / ftfy), runs benchmarks/gpu_check.py with BUDGET_S seconds (default 300) under a hard
# `timeout` of BUDGET_S + 60, keeps the log beside the results; the tables are printed last.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [BUDGET_S [gpu_check.py options...]]}
budget=${2:-300}
shift $(( $# >= 2 ? 2 : 1 ))
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/blocklora-site.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || { echo "error: cannot install .whl/*.whl (run scripts/get_gpu_wheels.sh here first)" >&2; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
timeout -k 15 $(( ${budget%.*} + 60 )) "$py" benchmarks/gpu_check.py --output "$out" --budget-s "$budget" "$@" \
  2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then  # killed: the tables of the sections it finished
  echo "gpu_check.py ran past its hard limit; $out/gpu_check.json holds the sections it finished" >&2
  cat "$out/gpu_check.md" 2>/dev/null
fi
exit "$rc"
