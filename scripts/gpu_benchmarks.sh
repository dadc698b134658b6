#!/usr/bin/env bash
# Every GPU measurement of the project in one go, a summary table last.
#   bash scripts/gpu_benchmarks.sh            # logs under $OUT (default: logs/gpu-benchmarks)
#   BUDGET_S=540 bash scripts/gpu_benchmarks.sh   # stop starting variants when time runs short
#   bash scripts/gpu_benchmarks.sh gpt2-124m llama-1b-1gpu   # only these variants
# Each line below is one variant: the project's training step (optionally against a bare PyTorch
# loop on the same model and batch) on one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-logs/gpu-benchmarks}"
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-100000}))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"

GPT2="--config configs/gpu.yaml --config configs/gpt2-124m.yaml"
LLAMA="--config configs/gpu.yaml --config configs/llama-1b.yaml --trainer.devices 1"
selected=" $* "
run() {  # name, time cap in seconds, then benchmark arguments
  local name=$1 cap=$2; shift 2
  [[ "$selected" == "  " || "$selected" == *" $name "* ]] || return 0
  local left=$((deadline - SECONDS - 20))  # keep 20 s for the table
  if ((left < 60)); then echo "skipped $name: out of time" | tee "$out/$name.log"; return; fi
  ((cap > left)) && cap=$left
  echo "== $name (at most $cap s)"
  timeout --kill-after 10 "$cap" python -m pretrain.commands.benchmark train "$@" > "$out/$name.log" 2>&1
  local status=$?
  ((status == 124 || status == 137)) && echo "timed out after $cap s" >> "$out/$name.log"
  echo "   exit $status; $(tail -n 1 "$out/$name.log" | cut -c1-300)"
}
# The attention kernel PyTorch picks by default for each model's training shapes (bf16, causal).
declare -A DEFAULT_KERNEL
while read -r model kernel; do DEFAULT_KERNEL[$model]=$kernel; done < <(python - <<'PY' | tee -a "$out/gpu.txt"
import torch
from torch.nn.attention import SDPBackend
from pretrain.model.config import PRESETS
names = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
         SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}
for model in ("gpt2-124m", "llama-1b"):
    c = PRESETS[model]
    q = torch.randn(1, c.n_head, c.seq_len, c.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, c.n_kv_head, c.seq_len, c.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    choice = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=c.n_kv_head != c.n_head)
    print(model, names.get(SDPBackend(choice), SDPBackend(choice).name))
PY
)
# The kernels that actually run for each model.attention_kernel setting, from the profiler (a
# one-block llama-1b, forward and backward; flash first in a fresh process, so that a choice
# overridden by PyTorch's lazy set-up of its own priorities on the first call would show).
timeout 120 python - <<'PY' 2>&1 | tee -a "$out/gpu.txt"
import torch
from torch.profiler import ProfilerActivity, profile
from pretrain.model.llama import Llama
from pretrain.model.config import PRESETS
from pretrain.model.losses import next_token_loss
from dataclasses import replace
model = Llama(replace(PRESETS["llama-1b"], n_layer=1, vocab_size=512)).to("cuda")
model.init_weights(0)
batch = torch.randint(0, 512, (2, model.config.seq_len + 1), device="cuda")
words = ("flash", "fmha", "sdpa", "cudnn", "attention")
for name in ("flash", "cudnn", "efficient", None):
    model.use_attention_kernel(name)
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", torch.bfloat16):
        next_token_loss(model, batch).ce.backward()
        torch.cuda.synchronize()
    ran = sorted({e.key[:70] for e in prof.key_averages() if any(w in e.key.lower() for w in words)})
    print(f"attention_kernel {name}: {ran}")
PY
kernel() {  # model, kernel, time cap, then benchmark arguments: one attention kernel, unless it is the default
  local model=$1 kernel=$2 cap=$3; shift 3
  if [[ "${DEFAULT_KERNEL[$model]:-}" == "$kernel" ]]; then
    [[ "$selected" == "  " || "$selected" == *" $model-$kernel "* ]] &&
      echo "skipped: $kernel is the default kernel, measured in $model" | tee "$out/$model-$kernel.log"
    return 0
  fi
  run "$model-$kernel" "$cap" "$@" --model.attention_kernel "$kernel" --no-bare
}

# Most telling first: the GPU configs as they are, then one lever each. Timed windows hold the
# logging steps (every 50) in their real proportion.
run gpt2-124m 200 $GPT2 --warmup 10 --steps 100
run llama-1b-fsdp1 240 $LLAMA --config configs/fsdp.yaml --warmup 8 --steps 50
# Document masking (FlexAttention) on each: MFU counts the attention the mask leaves to do.
run gpt2-124m-docmask 200 $GPT2 --model.attention_mask document --warmup 10 --steps 100
run llama-1b-docmask 240 $LLAMA --config configs/fsdp.yaml --model.attention_mask document --warmup 8 --steps 50
run gpt2-124m-muon 150 $GPT2 --model.optimizer pretrain.train.MuonWithAdamW --model.optimizer.init_args.lr 0.02 \
  --warmup 10 --steps 100 --no-bare
kernel gpt2-124m cudnn 120 $GPT2 --warmup 10 --steps 100
kernel gpt2-124m flash 120 $GPT2 --warmup 10 --steps 100
kernel llama-1b cudnn 150 $LLAMA --config configs/fsdp.yaml --warmup 8 --steps 50
kernel llama-1b flash 150 $LLAMA --config configs/fsdp.yaml --warmup 8 --steps 50
run gpt2-124m-mb64 100 $GPT2 --data.batch_size 64 --warmup 10 --steps 50 --no-bare
run llama-1b-fsdp2 240 $LLAMA --config configs/fsdp2.yaml \
  --warmup 8 --steps 50
run llama-1b-1gpu 150 $LLAMA \
  --warmup 8 --steps 50 --no-bare
run gpt2-124m-autotune 300 $GPT2 --model.compile_mode max-autotune-no-cudagraphs \
  --warmup 10 --steps 100 --no-bare
# How long a checkpoint save stalls training: written in place against in the background (one GPU).
if ((deadline - SECONDS > 240)); then
  echo "== checkpoint-stalls (at most 300 s)"
  timeout --kill-after 10 300 python scripts/checkpoint_stalls.py --model "{}" --steps 40 --every 10 -- \
    --config configs/gpu.yaml --config configs/gpt2-124m.yaml > "$out/checkpoint-stalls.txt" 2>&1
fi

python - "$out" <<'PY'
import json, pathlib, sys
print(f"\n{'variant':<20} {'project tok/s':>14} {'bare tok/s':>12} {'ratio':>7} {'MFU':>7} {'bare MFU':>9} {'peak GiB':>9}"
      "  steps that waited for the GPU")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.log"), key=lambda p: p.stat().st_mtime):
    try:
        r = json.loads(path.read_text().splitlines()[-1])
        print(f"{path.stem:<20} {r['project_tokens_per_sec']:>14} {r['bare_tokens_per_sec']!s:>12} {r['ratio']!s:>7} "
              f"{r['mfu']!s:>7} {r['bare_mfu']!s:>9} {r['peak_mem_gib']:>9}  {r.get('gpu_sync_steps')}")
    except (json.JSONDecodeError, KeyError, IndexError):
        lines = path.read_text().splitlines()
        reported = lines and lines[-1].startswith(("skipped", "timed out"))
        print(f"{path.stem:<20} {lines[-1][:100] if reported else 'failed: see ' + path.name}")
PY
if [[ -f "$out/checkpoint-stalls.txt" ]]; then
  echo; echo "checkpoint-stalls (gpt2-124m):"; tail -n 3 "$out/checkpoint-stalls.txt"
fi
