#!/usr/bin/env bash
# GPU check of chip on one CUDA device (an H100: under 8 minutes). Prints one table.
#
# The device machine has torch + torchvision but no Torch-Pruning and no network, so carry the
# pure-Python wheel in .whl/ (git-ignored). Download it once on a machine with a network:
#
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torch-pruning==1.6.1
#   # (add tqdm to that command if the device's Python lacks it)
#
# Then, from the repository root on the GPU machine (device tool: carry [".whl"]):
#
#   bash bench/gpu.sh                 # full check (CUDA)
#   bash bench/gpu.sh --smoke         # the same script at tiny sizes on the CPU
#   bash bench/gpu.sh --json out.json # also write the rows as JSON
#   bash bench/gpu.sh --latency       # bench/latency.py on CUDA instead (MACs vs measured latency,
#                                     # round_to=auto, latency=0.5; batch 1 and 64)
#   bash bench/gpu.sh --allocation-study  # bench/study_allocation.py at full size on CUDA instead
#                                         # (Fashion-MNIST files, nvidia-modelopt; about an hour)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# missing pure-Python deps go into .whl/site (no root, no system site-packages touched)
export PYTHONPATH="src:.whl/site${PYTHONPATH:+:$PYTHONPATH}"
for mod in torch_pruning tqdm; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
      echo "gpu.sh: $mod is missing and .whl/ holds no wheels; see the download command above" >&2
      exit 2
    fi
    "$PY" -m pip install -q --no-deps --no-index --find-links .whl --target .whl/site \
      "${mod//_/-}"
  fi
done
if [[ "${1:-}" == "--latency" ]]; then  # bench/latency.py on CUDA (latency tables by CUDA events)
  shift
  exec "$PY" bench/latency.py --device cuda "$@"
fi
if [[ "${1:-}" == "--allocation-study" ]]; then
  exec "$PY" bench/study_allocation.py --scale full --device cuda \
    --out-dir runs/study_allocation_full --results runs/study_allocation_full/RESULTS.md
fi
exec timeout 470 "$PY" bench/gpu_check.py "$@"
