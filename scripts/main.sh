#!/usr/bin/env bash
# The README's main job: the UME experiment on real Czech speech (fillets-cs), CPU.
#   parent  the small dense U2++ model, 60 minutes          runs/small-fillets
#   (a)     the parent trained 800 more steps, dense         runs/ume/a-dense
#   (b)     the parent upcycled (8 experts, top-2), 800 steps runs/ume/b-upcycled
#   (c)     the same MoE from scratch, parent's steps + 800  runs/ume/c-scratch (SCRATCH=0 skips it)
# then every model is evaluated on the held-out levels and the table is written to
# runs/ume/table.md, the report (plots, summary) to runs/ume/report/. Each finished stage
# is kept: rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
U=./target/release/upcycle
DATA=${DATA:-data/fillets-cs}
RUN=${RUN:-runs/small-fillets}
UME=${UME:-runs/ume}
MINUTES=${MINUTES:-60}
SCRATCH=${SCRATCH:-1}
$U data prepare --corpus fillets-cs --out "$DATA"
$U data check --data "$DATA/train" --config configs/dataset_conf.yaml

trained() { [ -e "$1/checkpoints/latest" ] && [ -e "$1/eval-test/results.json" ]; }
train_and_eval() { # NAME DIR ARGS...
  local dir=$2; shift 2
  if [ -e "$dir/checkpoints/latest" ]; then
    echo "$dir already holds a trained model; delete it to train again" >&2
  else
    $U train --data "$DATA" --out "$dir" "$@"
  fi
  trained "$dir" || $U eval --checkpoint "$dir" --data "$DATA/test" --out "$dir/eval-test"
}

train_and_eval parent "$RUN" --config configs/small.yaml --max-minutes "$MINUTES"
mkdir -p "$UME"
[ -e "$UME/upcycled/latest" ] ||
  $U convert upcycle --from "$RUN/checkpoints" --experts 8 --top-k 2 --out "$UME/upcycled"
train_and_eval a "$UME/a-dense" --config configs/small-continue.yaml --init "$RUN/checkpoints"
train_and_eval b "$UME/b-upcycled" --config configs/small-upcycle.yaml --init "$UME/upcycled"
rows=("parent=$RUN" "a-dense-continued=$UME/a-dense" "b-upcycled=$UME/b-upcycled")
if [ "$SCRATCH" = 1 ]; then
  parent_steps=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" \
    "$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")/state.json")
  train_and_eval c "$UME/c-scratch" --config configs/small-moe-scratch.yaml \
    --max-steps $((parent_steps + 800))
  rows+=("c-moe-scratch=$UME/c-scratch")
fi
$U inspect runs "${rows[@]}" | tee "$UME/table.md"
$U inspect routing --checkpoint "$UME/b-upcycled/checkpoints" --data "$DATA/test" | tee "$UME/routing-b.md"
# Pictures and a summary: training curves, expert load over time, dev CER against wall time
# with (a) and (b) drawn after their parent.
$U report "${rows[@]}" --after a-dense-continued=parent --after b-upcycled=parent --out "$UME/report"
