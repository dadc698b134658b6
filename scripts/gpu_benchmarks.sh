#!/usr/bin/env bash
# Every GPU measurement of the project in one go, a summary table last.
#   bash scripts/gpu_benchmarks.sh            # logs under $OUT (default: logs/gpu-benchmarks)
# Each config's training step is timed against a bare PyTorch loop on the same model and batch.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-logs/gpu-benchmarks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"

run() {  # name, then benchmark arguments
  local name=$1; shift
  python -m pretrain.benchmark train "$@" 2>&1 | tee "$out/$name.log" | grep -v '^{' || true
  tail -n 1 "$out/$name.log" > "$out/$name.json"
}
run gpt2-124m --config configs/gpt2-124m.yaml --warmup 10 --steps 50
run llama-1b --config configs/llama-1b-fsdp.yaml --warmup 10 --steps 30 --trainer.devices 1

python - "$out" <<'PY'
import json, pathlib, sys
print(f"\n{'config':<12} {'project tok/s':>14} {'bare tok/s':>12} {'ratio':>7} {'MFU':>7} {'peak GiB':>9}")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"{path.stem:<12} failed: see {path.with_suffix('.log')}")
        continue
    print(f"{path.stem:<12} {r['project_tokens_per_sec']:>14} {r['bare_tokens_per_sec']:>12} {r['ratio']:>7} "
          f"{r['mfu']!s:>7} {r['peak_mem_gib']:>9}")
PY
