#!/usr/bin/env bash
# Every GPU check and benchmark of this checkout in one command, on a GPU machine, from a
# `.gpu/` packed here by ../shared/tools/gpu-pack.sh (pass the nccl test binary to it):
#
#   here:     cargo test --release -p upcycle-parallel --test nccl --no-run
#             ../shared/tools/gpu-pack.sh target/release/deps/nccl-<hash>
#   there:    source .gpu/env.sh && bash bench/gpu.sh [OUT_DIR]
#
# Runs: the NCCL tests with UPCYCLE_REQUIRE_GPU=1 (no silent skip), the measured bf16
# matrix-product peak, the training step against the PyTorch peer (dense and MoE, fp32 and
# bf16) on the packed real utterances, and a short `upcycle train --device cuda` + eval.
# Prints one table last; full logs and JSON go to OUT_DIR (default $OUT, else /tmp/gpu-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu
out=${1:-${OUT:-/tmp/gpu-bench}}
mkdir -p "$out"
rows=()
row() { rows+=("$(printf '%-44s %s' "$1" "$2")"); }

if ls $G/nccl-test >/dev/null 2>&1; then
  if UPCYCLE_REQUIRE_GPU=1 $G/nccl-test --test-threads 1 >"$out/nccl.log" 2>&1; then
    row "nccl tests (UPCYCLE_REQUIRE_GPU=1)" "passed"
  else
    row "nccl tests (UPCYCLE_REQUIRE_GPU=1)" "FAILED (see $out/nccl.log)"
  fi
else
  row "nccl tests" "not packed (pass the nccl test binary to gpu-pack.sh)"
fi

peak=$(python3 - <<'PY' 2>"$out/peak.log"
import torch
n = 8192
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    start.record(); a @ b; end.record(); torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
times.sort()
print(f"{2 * n**3 / times[len(times) // 2] / 1e12:.0f}")
PY
)
row "bf16 matmul peak, 8192^3 (TFLOP/s, median)" "${peak:-FAILED (see $out/peak.log)}"

step() { # NAME CONFIG PRECISION BATCH_FRAMES (a length-sorted batch, as training's loader makes)
  local json="$out/step-$1.json"
  if python3 bench/train_step.py --device cuda --bin $G/upcycle --list $G/data/train/data.list \
      --config "configs/$2.yaml" --precision "$3" --batch-frames "$4" --threads 8 --steps 10 \
      --warmup 3 --repeat 3 ${peak:+--peak-tflops "$peak"} --json "$json" >"$out/step-$1.log" 2>&1; then
    row "step $1 (<= $4 frames)" "$(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))
mfu = f\", MFU {r['upcycle_mfu']:.1%} vs {r['peer_mfu']:.1%}\" if 'upcycle_mfu' in r else ''
print(f\"{r['upcycle_frames_per_s']:,.0f} vs {r['peer_frames_per_s']:,.0f} frames/s: {r['ratio_median']:.2f}x{mfu}\")" "$json")"
  else
    row "step $1" "FAILED (see $out/step-$1.log)"
  fi
}
step dense-bf16 wenet-u2pp-conformer bf16 32000
step moe-bf16 wenet-u2pp-moe bf16 32000
step dense-fp32 wenet-u2pp-conformer fp32 32000
step moe-fp32 wenet-u2pp-moe fp32 32000

run="$out/train"
rm -rf "$run"
if $G/upcycle train --device cuda --config configs/wenet-u2pp-moe.yaml --data $G/data --out "$run" \
     --max-steps 30 >"$out/train.log" 2>&1 &&
   $G/upcycle eval --device cuda --checkpoint "$run" --data $G/data/test --out "$run/eval" \
     >"$out/eval.log" 2>&1; then
  row "upcycle train + eval --device cuda (30 steps)" "passed"
else
  row "upcycle train + eval --device cuda (30 steps)" "FAILED (see $out/train.log, eval.log)"
fi

echo
echo "GPU checks ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)); logs in $out"
printf '%s\n' "${rows[@]}"
