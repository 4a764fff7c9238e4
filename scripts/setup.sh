#!/usr/bin/env bash
# Installs everything upcycle needs on a fresh Debian machine (run as root), then builds
# the `upcycle` binary. Idempotent: a second run only checks and exits quickly.
#
#   apt packages  MPI (build and run), libclang (bindgen), sox + espeak-ng (data
#                 preparation) and the real speech corpora of ../shared/design/DATA.md
#   .venv         torch 2.11.0 (libtorch for tch) + the Python reference implementations
#   target/       the release build of the workspace
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential pkg-config libclang-dev libopenmpi-dev openmpi-bin
  sox libsox-fmt-base espeak-ng fortunes-min
  fillets-ng-data fillets-ng-data-cs
  asterisk-core-sounds-en-wav asterisk-core-sounds-en
  asterisk-core-sounds-es-wav asterisk-core-sounds-es
  asterisk-core-sounds-fr-wav asterisk-core-sounds-fr
  asterisk-core-sounds-it-wav asterisk-core-sounds-it
  asterisk-core-sounds-ru-wav asterisk-core-sounds-ru
  pocketsphinx-testdata
)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Python environment that holds libtorch. Re-installed when requirements.txt changes.
stamp=".venv/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating .venv with torch 2.11.0 (a few GB from PyPI; cached by pip afterwards)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" >"$stamp"
fi
torch_dir=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
# .cargo/config.toml points LIBTORCH at this link, so plain `cargo` commands work. The
# link is relative, so it stays right when .venv is reached through another path (a git
# worktree linking to this .venv).
ln -sfn "$(realpath --relative-to=.venv "$torch_dir")" .venv/libtorch
# NCCL for the GPU backend: the wheel ships libnccl.so.2, cudarc opens libnccl.so; the
# binaries' run path includes libtorch's lib folder, so the link goes there.
nccl=$(ls "$torch_dir"/../nvidia/nccl/lib/libnccl.so.2 2>/dev/null || true)
if [ -n "$nccl" ]; then ln -sfn "$(realpath "$nccl")" "$torch_dir/lib/libnccl.so"; fi

if ! command -v cargo >/dev/null; then
  log "cargo not found: install the Rust toolchain (https://rustup.rs) and rerun"; exit 1
fi
log "building upcycle (release)"
cargo build --release --locked --bin upcycle
log "ready: target/release/upcycle"
