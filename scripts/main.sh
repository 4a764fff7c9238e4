#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install everything, prepare the real
# Czech corpus (Fish Fillets NG, split by level), train the `small` dense U2++ Conformer
# on it (60 minutes on 2 cores by default), and print the CER table of the held-out
# levels for every decoding method, full context and chunk 16.
#   DATA=data/fillets-cs   where the dataset goes
#   RUN=runs/small-fillets where the training run goes (an existing run is resumed from
#                          scratch only if you delete it)
#   MINUTES=60             training time
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${DATA:-data/fillets-cs}
RUN=${RUN:-runs/small-fillets}
MINUTES=${MINUTES:-60}
./target/release/upcycle data prepare --corpus fillets-cs --out "$DATA"
./target/release/upcycle data check --data "$DATA/train" --config configs/dataset_conf.yaml
if [ -e "$RUN/checkpoints/latest" ]; then
  echo "$RUN already holds a trained model; delete it to train again" >&2
else
  ./target/release/upcycle train --config configs/small.yaml --data "$DATA" --out "$RUN" --max-minutes "$MINUTES"
fi
./target/release/upcycle eval --checkpoint "$RUN" --data "$DATA/test" --out "$RUN/eval-test"
