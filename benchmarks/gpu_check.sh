#!/usr/bin/env bash
# The checks only a GPU can make, as one prepared run (a lent H100/H200 has ~15 minutes a session).
#   bash benchmarks/gpu_check.sh            set up (scripts/setup.sh dev: PyPI's CUDA torch), then run
#   bash benchmarks/gpu_check.sh --dry-run  print the commands, run nothing (CI checks the script this way)
# Results land in ${OUT:-gpu_results}/: the CUDA tests' log and the step-overhead JSON/table on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
steps=(
  "bash scripts/setup.sh dev"
  ".venv/bin/python -c 'import torch; assert torch.cuda.is_available(), \"no CUDA device\"; print(torch.cuda.get_device_name())'"
  # CUDA-only tests: Triton kernels, CPU/CUDA parity of every deterministic method (the new ones included), fp16 skips
  ".venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cuda.py"
  # what each method costs on top of its passes on CUDA (ResNet-18 and ViT-S/16, bf16 autocast)
  ".venv/bin/python benchmarks/step_overhead.py --device cuda --steps 50 --json $out/step_overhead_cuda.json"
  ".venv/bin/python benchmarks/flat_lora_step.py --device cuda"
)
if [ "${1:-}" = "--dry-run" ]; then
  printf '%s\n' "${steps[@]}"
  exit 0
fi
mkdir -p "$out"
failed=0
for cmd in "${steps[@]}"; do  # every check runs even when an earlier one fails: device time is scarce
  echo "+ $cmd" | tee -a "$out/gpu_check.log"
  bash -c "$cmd" 2>&1 | tee -a "$out/gpu_check.log" || { echo "FAILED: $cmd" | tee -a "$out/gpu_check.log"; failed=1; }
done
exit $failed
