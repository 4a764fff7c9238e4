#!/usr/bin/env bash
# The main job, end to end on a fresh machine: install everything, prepare the real
# Czech corpus (Fish Fillets NG, split by level), print its statistics, and read its
# training list the way training will (bad-input report, batches per rank, loading speed).
# Training joins this script when the dense-model issue lands.
#   DATA=data/fillets-cs  where the dataset goes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${DATA:-data/fillets-cs}
./target/release/upcycle data prepare --corpus fillets-cs --out "$DATA"
./target/release/upcycle data check --data "$DATA/train" --config configs/dataset_conf.yaml --world 2 --iterate
