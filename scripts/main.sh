#!/usr/bin/env bash
# The README's main job: the UME experiment (issue 20) on real speech in six languages
# (`data prepare --corpus multilingual`: Fillets NG Czech + Asterisk en/es/fr/it/ru), CPU.
#   parent  the small dense U2++ model (configs/multilingual.yaml)   runs/multilingual
#   (a)     the parent trained EXTRA_STEPS more steps, dense          runs/ume/a-dense
#   (b)     the parent upcycled by each of METHODS, EXTRA_STEPS steps runs/ume/b-<method>
#   (c)     the same MoE from scratch, parent's steps + EXTRA_STEPS   runs/ume/c-scratch (SCRATCH=0 skips it)
# then every model's last checkpoint is evaluated on the held-out test set (CER per
# language; RTF in full context and at chunk 16, measured back to back by one `eval`),
# and the table is written to runs/ume/table.md, its numbers to runs/ume/ume.json (the
# form of docs/experiments/ume.json), the report (plots, summary) to runs/ume/report/.
# Each finished stage is kept: rerunning continues where it stopped.
#
# Budgets are steps, not minutes, so that the models (and the table's CER) are the same on
# a loaded or a faster machine; only the minutes differ. The parent's learning rate is
# annealed to its floor at its last step (a finished parent); (a) and (b) re-warm and
# decay to the same floor over their EXTRA_STEPS. On 2 cores: data 1 min; parent
# PARENT_STEPS=3000 (~23 min); (a) and each (b) EXTRA_STEPS=1200 (~9 and ~10-12 min);
# (c) parent's steps + EXTRA_STEPS (~40 min); evaluation ~2 min per model: ~110 min with
# the default METHODS ("copy top1": 8 experts top-2, and 4 experts top-1 at the parent's
# active size). METHODS="copy top1 noise drop granular kmeans kmeans-top1" runs every
# method (kmeans: copies routed by k-means of the parent's tokens, `convert upcycle
# --router-init kmeans`). FFN=64 narrows every model's feed-forward networks (the
# 2026-12-07 variant of docs/experiments/ume.md). SYNTH=N adds N espeak-ng utterances
# per language to the training split (`data prepare --synth`; dev and test stay real),
# in data/multilingual-synthN. UPCYCLE names another build of the
# binary (default: this checkout's release build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
U=${UPCYCLE:-./target/release/upcycle}
SYNTH=${SYNTH:-0}
if [ "$SYNTH" = 0 ]; then
  DATA=${DATA:-data/multilingual}
else
  DATA=${DATA:-data/multilingual-synth$SYNTH}
fi
RUN=${RUN:-runs/multilingual}
UME=${UME:-runs/ume}
METHODS=${METHODS:-copy top1}
PARENT_STEPS=${PARENT_STEPS:-3000}
EXTRA_STEPS=${EXTRA_STEPS:-1200}
SCRATCH=${SCRATCH:-1}
# FFN: every model's feed-forward width (linear_units; granular experts a quarter of it)
# instead of the configs' 256. CONTINUE_LR: the peak learning rate that (a) and every (b)
# re-warm to instead of the configs' 5e-4; 0.002, the parent's own peak, made both better
# and the copies more so (docs/experiments/ume.md, run of 2026-12-08). Either writes copies
# of the configs to $UME/configs.
FFN=${FFN:-}
CONTINUE_LR=${CONTINUE_LR:-}
if [ -n "$CONTINUE_LR" ] && ! python3 -c 'import sys; assert float(sys.argv[1]) > 0' "$CONTINUE_LR" 2>/dev/null; then
  echo "CONTINUE_LR=$CONTINUE_LR is not a positive learning rate (e.g. CONTINUE_LR=0.002)" >&2
  exit 2
fi
CONFIGS=configs
if [ -n "$FFN$CONTINUE_LR" ]; then
  CONFIGS=$UME/configs
  mkdir -p "$CONFIGS"
  for f in configs/multilingual*.yaml; do
    edits=(-e '')
    [ -z "$FFN" ] || edits+=(-e "s/^\(  linear_units:\) .*/\1 $FFN/"
      -e "s/^\(  expert_linear_units:\) .*/\1 $((FFN / 4))/")
    case $(basename "$f") in
      multilingual-continue.yaml | multilingual-upcycle*.yaml)
        [ -z "$CONTINUE_LR" ] || edits+=(-e "s/^\(optim_conf: {lr:\) [^,]*,/\1 $CONTINUE_LR,/") ;;
    esac
    sed "${edits[@]}" "$f" >"$CONFIGS/$(basename "$f")"
    # A config whose optim_conf line no longer has the one-line form would keep its rate silently.
    if [ -n "$CONTINUE_LR" ] && [[ $f == *continue.yaml || $f == *upcycle*.yaml ]] &&
      ! grep -q "^optim_conf: {lr: $CONTINUE_LR," "$CONFIGS/$(basename "$f")"; then
      echo "CONTINUE_LR could not be set in $f: its line 'optim_conf: {lr: ...}' is missing" >&2
      exit 2
    fi
  done
fi
$U data prepare --corpus multilingual --synth "$SYNTH" --out "$DATA"
$U data check --data "$DATA/train" --config configs/dataset_conf.yaml

train_and_eval() { # DIR ARGS...
  local dir=$1; shift
  if [ -e "$dir/checkpoints/latest" ]; then
    echo "$dir already holds a trained model; delete it to train again" >&2
  else
    $U train --data "$DATA" --out "$dir" "$@"
  fi
  [ -e "$dir/eval-test/results.json" ] ||
    # The last checkpoint, not the best on dev: the comparison is at equal steps, and
    # a 200-step dev pick can be nearly the parent.
    $U eval --checkpoint "$dir/checkpoints/latest" --data "$DATA/test" --out "$dir/eval-test" \
      --chunk 0 --chunk 16
}

# `convert upcycle` arguments of each method.
upcycle_args() { # METHOD
  case $1 in
    copy | noise | drop) echo "--method $1 --experts 8 --top-k 2" ;;
    granular) echo "--method granular --experts 16 --top-k 4 --granularity 4 --router softmax_topk --router-init zero" ;;
    top1) echo "--method copy --experts 4 --top-k 1 --router softmax_topk --router-init zero" ;;
    kmeans) echo "--method copy --experts 8 --top-k 2 --router-init kmeans --router-data $DATA/train" ;;
    kmeans-top1) echo "--method copy --experts 4 --top-k 1 --router softmax_topk --router-init kmeans --router-data $DATA/train" ;;
    *) echo "unknown method $1 in METHODS (copy, noise, drop, granular, top1, kmeans, kmeans-top1)" >&2; return 1 ;;
  esac
}
# The upcycling method of a METHODS entry (top1: copy, routed at the parent's cost;
# kmeans: copy, its routers fitted to the parent's tokens on the training set).
method_of() { # METHOD
  case $1 in top1 | kmeans | kmeans-top1) echo copy ;; *) echo "$1" ;; esac
}
# The training config of a method: its own when it changes the experts' shape
# (kmeans-top1: top1's).
upcycle_config() { # METHOD
  local own=$CONFIGS/multilingual-upcycle-${1#kmeans-}.yaml
  if [ -e "$own" ]; then echo "$own"; else echo "$CONFIGS/multilingual-upcycle.yaml"; fi
}

train_and_eval "$RUN" --config "$CONFIGS/multilingual.yaml" --max-steps "$PARENT_STEPS"
mkdir -p "$UME"
train_and_eval "$UME/a-dense" --config "$CONFIGS/multilingual-continue.yaml" --init "$RUN/checkpoints" \
  --max-steps "$EXTRA_STEPS"
rows=("parent=$RUN" "a-dense=$UME/a-dense")
methods=(--method parent=parent --method a-dense=dense)
after=(--after a-dense=parent)
for m in $METHODS; do
  args=$(upcycle_args "$m")
  [ -e "$UME/upcycled-$m/latest" ] ||
    # shellcheck disable=SC2086 # the arguments are words
    $U convert upcycle --from "$RUN/checkpoints" $args --out "$UME/upcycled-$m"
  train_and_eval "$UME/b-$m" --config "$(upcycle_config "$m")" --init "$UME/upcycled-$m" \
    --max-steps "$EXTRA_STEPS"
  rows+=("b-$m=$UME/b-$m")
  methods+=(--method "b-$m=$(method_of "$m")")
  after+=(--after "b-$m=parent")
done
if [ "$SCRATCH" = 1 ]; then
  parent_steps=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" \
    "$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")/state.json")
  train_and_eval "$UME/c-scratch" --config "$CONFIGS/multilingual-moe-scratch.yaml" \
    --max-steps $((parent_steps + EXTRA_STEPS))
  rows+=("c-scratch=$UME/c-scratch")
  methods+=(--method c-scratch=scratch)
fi
command="METHODS='$METHODS' PARENT_STEPS=$PARENT_STEPS EXTRA_STEPS=$EXTRA_STEPS${FFN:+ FFN=$FFN}${CONTINUE_LR:+ CONTINUE_LR=$CONTINUE_LR}$([ "$SYNTH" = 0 ] || echo " SYNTH=$SYNTH") ./run main"
$U inspect runs "${rows[@]}" "${methods[@]}" --json "$UME/ume.json" --command "$command" |
  tee "$UME/table.md"
for m in $METHODS; do
  $U inspect routing --checkpoint "$UME/b-$m/checkpoints" --data "$DATA/test" | tee "$UME/routing-b-$m.md"
done
# Pictures and a summary: training curves, expert load over time, dev CER against wall time
# with (a) and (b) drawn after their parent.
$U report "${rows[@]}" "${after[@]}" --out "$UME/report"
