#!/usr/bin/env bash
# Every GPU benchmark of llama_jax on one GPU, unattended, in under 8 minutes; JSON lines to
# benchmarks/results/<date>-<card>.jsonl (one per benchmark, plus a first line describing the machine).
#
#   bash benchmarks/gpu.sh                    # from the repository root, on a machine with one GPU
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Needs only python3 with jax (CUDA), flax, optax, orbax, torch (CUDA), transformers, tiktoken and safetensors:
# the benchmarks import no ml_collections, grain or llama-models (tests/project/test_benchmarks.py checks it). Runs, each
# under its own time limit so that one that hangs cannot eat the others' time:
#   1. train step, llama3.2-1b, 4 x 2048, bf16 compute, remat dots_no_batch  vs transformers eager (sdpa, bf16
#      autocast, fused AdamW), with and without gradient checkpointing
#      and the same with attention="flash" (the fused Pallas kernel of llama_jax/ops/flash_attention.py)
#   2. train step, llama3.1-8b shape with 4 layers, 2 x 4096, remat full      vs the same
#   3. decode, llama3.2-1b bf16, batch 1 / 8 / 32, prompt 128, 64 new tokens  vs transformers generate, static
#      cache (torch.compile'd by transformers) and dynamic cache
#   4. parity: logits vs transformers, float32 and bfloat16 (benchmarks/parity.py)
#   5. LoRA (rank 16, every projection) vs full fine-tuning, llama3.2-1b, 4 x 2048, bf16 (benchmarks/lora.py)
#   6. benchmarks/attention.py (fused attention kernels vs dense), where the checkout has it
# A run that fails or times out leaves a line {"benchmark": ..., "error": ...} and the script goes on.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9.\n' '-')
card=${card:-unknown-gpu}
out="benchmarks/results/$(date -u +%Y-%m-%d)-${card}.jsonl"
mkdir -p benchmarks/results
log="${out%.jsonl}.log"
start=$SECONDS

"$PYTHON" - "$card" >> "$out" <<'EOF'
import json, platform, subprocess, sys
import jax, torch, transformers
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    smi = None
print(json.dumps({"benchmark": "machine", "card": sys.argv[1], "nvidia_smi": smi, "commit": commit,
                  "jax": jax.__version__, "jax_devices": [d.device_kind for d in jax.devices()],
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()}))
EOF

# run NAME SECONDS COMMAND...: the command's last stdout line (a JSON object) goes to $out, all else to $log.
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)" | tee -a "$log" >&2
    local last
    last=$(timeout "$limit" "$@" 2>>"$log" | tee -a "$log" | tail -1)
    local status=$?
    if [[ $status -eq 0 && $last == "{"* ]]; then
        echo "$last" >> "$out"
    elif [[ $status -eq 124 ]]; then
        echo "{\"benchmark\": \"$name\", \"error\": \"stopped after its ${limit} s; see $log\"}" >> "$out"
    else
        echo "{\"benchmark\": \"$name\", \"error\": \"exit status $status; see $log\"}" >> "$out"
    fi
}

# Time limits (s) add up to under 8 minutes; each benchmark stops a process past its --time-limit and reports it.
train="$PYTHON benchmarks/train_step.py --dtype bfloat16 --baselines torch,torch-ckpt --alternations 1 --steps 5 \
--warmup 2"
run train_1b 100 $train --preset llama3.2-1b --batch 4 --seq 2048 --remat dots_no_batch --time-limit 90
run train_1b_flash 80 $train --preset llama3.2-1b --batch 4 --seq 2048 --remat dots_no_batch --attention flash \
    --baselines "" --time-limit 70
run train_8b_4_layers 100 $train --preset llama3.1-8b --layers 4 --batch 2 --seq 4096 --remat full --time-limit 90
run decode_1b 110 "$PYTHON" benchmarks/decode.py --preset llama3.2-1b --dtype bfloat16 --prompt 128 \
    --new-tokens 64 --alternations 1 --repeats 2 --time-limit 100
run parity 40 "$PYTHON" benchmarks/parity.py
run lora_1b 45 "$PYTHON" benchmarks/lora.py --preset llama3.2-1b --batch 4 --seq 2048 --dtype bfloat16 --remat full \
    --alternations 1 --time-limit 40
left=$((470 - (SECONDS - start)))
if [[ -f benchmarks/attention.py && $left -gt 10 ]]; then
    run attention $left "$PYTHON" benchmarks/attention.py
fi
echo "done in $((SECONDS - start)) s: $out (stderr of every run: $log)" >&2
