#!/usr/bin/env bash
# The checks only a GPU can make, as one prepared run (a lent H100/H200 has ~15 minutes a session).
#   bash benchmarks/gpu_check.sh            set up (scripts/setup.sh dev: PyPI's CUDA torch), assert CUDA, then
#                                           run every check with its own time budget (515 s in all, 540 s cap)
#   bash benchmarks/gpu_check.sh --dry-run  the same checks on the CPU at toy sizes, no setup, with
#                                           ${PYTHON:-.venv/bin/python} (CI runs this: tests/test_benchmarks.py)
#   further arguments go to benchmarks/gpu_check.py (e.g. --only flat_lora_step,hessian)
# Results land in ${OUT:-gpu_results}/: summary.json, summary.md (one row per check) and, per check, its
# stdout, stderr and JSON or JUnit XML. Exit status 0 when no check failed or ran out of time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"

if [ "${1:-}" = "--dry-run" ]; then
  shift
  exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py --dry-run --out "$out" "$@"
fi

start=$(date +%s)
echo "+ bash scripts/setup.sh dev (log: $out/setup.log)"
bash scripts/setup.sh dev >"$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; echo "FAILED: setup" >&2; exit 1; }
setup_seconds=$(( $(date +%s) - start ))
.venv/bin/python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
exec .venv/bin/python benchmarks/gpu_check.py --out "$out" --python .venv/bin/python --setup-seconds "$setup_seconds" "$@"
