#!/usr/bin/env bash
# RTF of the UME comparison's models measured back to back, for docs/experiments/ume.json:
# attention rescoring, full context and chunk 16, on 60 test utterances (10 per language),
# ROUNDS rounds (default 5) with the models interleaved in each, median per model. Run it with nothing
# else on the machine; main.sh's own RTF columns come from evaluations run beside training.
#   bash scripts/ume_rtf.sh runs/multilingual runs/ume/a-dense runs/ume/b-copy ...
set -euo pipefail
cd "$(dirname "$0")/.."
U=${UPCYCLE:-./target/release/upcycle}
DATA=${DATA:-data/multilingual}
OUT=${OUT:-runs/ume/rtf}
ROUNDS=${ROUNDS:-5}
mkdir -p "$DATA/test-rtf60" "$OUT"
python3 - "$DATA/test/data.list" "$DATA/test-rtf60/data.list" <<'P'
import collections, json, sys
by = collections.defaultdict(list)
for line in open(sys.argv[1]):
    by[json.loads(line).get("lang")].append(line)
open(sys.argv[2], "w").writelines(l for lang in sorted(by) for l in by[lang][:10])
P
for round in $(seq "$ROUNDS"); do
  for r in "$@"; do
    # A run's last checkpoint, as main.sh evaluates its CER (eval's own default is best dev).
    ckpt=$r
    if [ -e "$r/checkpoints/latest" ]; then ckpt=$r/checkpoints/latest; fi
    $U eval --checkpoint "$ckpt" --data "$DATA/test-rtf60" --mode attention-rescoring \
      --chunk 0 --chunk 16 --out "$OUT/$(basename "$r")-$round" >/dev/null
  done
done
python3 - "$OUT" "$ROUNDS" "$@" <<'P'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
for r in sys.argv[3:]:
    n = os.path.basename(r)
    rtf = {0: [], 16: []}
    for k in range(1, rounds + 1):
        for m in json.load(open(f"{out}/{n}-{k}/results.json")):
            rtf[m["chunk"]].append(m["rtf"])
    print(json.dumps({"run": r, "rtf_full": statistics.median(rtf[0]),
                      "rtf_chunk16": statistics.median(rtf[16]), "rounds": rtf}))
P
