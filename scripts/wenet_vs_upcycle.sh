#!/usr/bin/env bash
# Issue 20's "dense trainer, held against WeNet's own": the same train.yaml
# (configs/multilingual-wenet.yaml), the same data (`data prepare --corpus multilingual`),
# the same wall-time budget and the same 2 threads, trained once by WeNet's own loop
# (its wenet/bin/train.py, via scripts/wenet_train.py) and once by `upcycle train`, for
# each seed, one after the other on an otherwise idle machine (WeNet then upcycle, seed by
# seed, so a slow spell of the machine hits both). Both models are then decoded the same
# way: WeNet's checkpoint is read by `convert import-wenet` (whose model computes what
# WeNet's does: tests/golden/wenet) and both are evaluated by `upcycle eval` on the
# held-out test set, full context. Writes OUT/table.md and OUT/comparison.json.
#
#   WENET=/path/to/wenet-checkout [WENET_DEPS=DIR] [MINUTES=20] [SEEDS="1 2"] \
#     bash scripts/wenet_vs_upcycle.sh [OUT]
#
# WENET: a checkout of github.com/wenet-e2e/wenet (tested at 015469960db7); WENET_DEPS:
# where scripts/wenet_deps.sh installs what WeNet imports (installed when missing).
# About (2 x MINUTES + 1) minutes per seed: 82 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/wenet-vs-upcycle}
U=${UPCYCLE:-./target/release/upcycle}
DATA=${DATA:-data/multilingual}
CONFIG=${CONFIG:-configs/multilingual-wenet.yaml}
MINUTES=${MINUTES:-20}
SEEDS=${SEEDS:-1 2}
WENET=${WENET:?set WENET to a checkout of github.com/wenet-e2e/wenet}
WENET_DEPS=${WENET_DEPS:-.wenet-deps}
# WeNet's DataLoader workers (its feature extraction): 2 gave it the most steps on 2 cores
# (178 steps in a minute; 166 with 1).
WENET_WORKERS=${WENET_WORKERS:-2}
[ -e "$WENET/wenet/bin/train.py" ] || { echo "WENET=$WENET holds no wenet/bin/train.py" >&2; exit 2; }
bash scripts/wenet_deps.sh "$WENET_DEPS"
$U data prepare --corpus multilingual --out "$DATA"
mkdir -p "$OUT"

evaluate() { # CHECKPOINT DIR
  [ -e "$2/eval-test/results.json" ] ||
    $U eval --checkpoint "$1" --data "$DATA/test" --out "$2/eval-test" --chunk 0
}

for seed in $SEEDS; do
  w="$OUT/wenet-s$seed"
  if [ ! -e "$w/summary.json" ]; then
    rm -rf "$w"
    PYTHONPATH=$(realpath "$WENET_DEPS") .venv/bin/python scripts/wenet_train.py \
      --wenet "$WENET" --config "$CONFIG" --data "$DATA" --out "$w" --minutes "$MINUTES" \
      --seed "$seed" --num-workers "$WENET_WORKERS" >"$OUT/wenet-s$seed.log" 2>&1
  fi
  if [ ! -e "$w/ours/latest" ]; then
    read -r ckpt conf < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["checkpoint"], s["config"])' "$w/summary.json")
    $U convert import-wenet --checkpoint "$ckpt" --config "$conf" --units "$DATA/units.txt" \
      --cmvn "$DATA/global_cmvn" --out "$w/ours"
  fi
  evaluate "$w/ours/latest" "$w"

  u="$OUT/upcycle-s$seed"
  if [ ! -e "$u/checkpoints/latest" ]; then
    rm -rf "$u"
    mkdir -p "$u"
    sed "s/^  seed: .*/  seed: $seed/" "$CONFIG" >"$u.yaml"
    /usr/bin/time -f '%e' -o "$u.wall_s" \
      $U train --config "$u.yaml" --data "$DATA" --out "$u" --max-minutes "$MINUTES" \
      >"$OUT/upcycle-s$seed.log" 2>&1
  fi
  evaluate "$u/checkpoints/latest" "$u"
done

python3 - "$OUT" "$MINUTES" $SEEDS <<'PY'
import json, os, statistics, sys
out, minutes, seeds = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

def cer(run):
    rows = json.load(open(os.path.join(out, run, "eval-test", "results.json")))
    return {r["method"]: r for r in rows if r["chunk"] == 0}

def ours_steps(run):
    return max(json.loads(l).get("step", 0) for l in open(os.path.join(out, run, "metrics.jsonl")))

runs = []
for seed in seeds:
    w = json.load(open(os.path.join(out, f"wenet-s{seed}", "summary.json")))
    wall = float(open(os.path.join(out, f"upcycle-s{seed}.wall_s")).read())
    for system, run, steps, wall_min in (
            ("wenet", f"wenet-s{seed}", w["steps"], w["wall_min"]),
            ("upcycle", f"upcycle-s{seed}", ours_steps(f"upcycle-s{seed}"), wall / 60)):
        c = cer(run)
        runs.append({"system": system, "seed": int(seed), "steps": steps,
                     "wall_min": round(wall_min, 2),
                     "cer_attention_rescoring": c["attention_rescoring"]["cer"],
                     "cer_ctc_greedy": c["ctc_greedy"]["cer"],
                     "cer_by_language": c["attention_rescoring"]["cer_by_language"]})
json.dump({"minutes": minutes, "runs": runs}, open(os.path.join(out, "comparison.json"), "w"),
          indent=1)
langs = sorted(runs[0]["cer_by_language"])
lines = [f"Budget {minutes:g} min per run; test CER % (full context).", "",
         "| system | seed | steps | wall min | CER rescoring | CER CTC greedy | " +
         " | ".join(langs) + " |", "|---|---:|---:|---:|---:|---:|" + "---:|" * len(langs)]
for r in runs:
    lines.append(f"| {r['system']} | {r['seed']} | {r['steps']} | {r['wall_min']:.1f} | "
                 f"{r['cer_attention_rescoring']:.2f} | {r['cer_ctc_greedy']:.2f} | " +
                 " | ".join(f"{r['cer_by_language'][l]:.2f}" for l in langs) + " |")
for system in ("wenet", "upcycle"):
    mine = [r for r in runs if r["system"] == system]
    lines.append(f"| **{system} mean** | | {statistics.mean(r['steps'] for r in mine):.0f} | | "
                 f"**{statistics.mean(r['cer_attention_rescoring'] for r in mine):.2f}** | "
                 f"{statistics.mean(r['cer_ctc_greedy'] for r in mine):.2f} |" + " |" * len(langs))
open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
