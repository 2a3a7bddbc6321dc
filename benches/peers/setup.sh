#!/usr/bin/env bash
# Creates the reference peers' Python environment: a venv OUTSIDE the repository
# ($PEERS_VENV, default $CAIRN_HOME/venv-peers, CAIRN_HOME defaulting to ~/.cache/cairn)
# with the pinned packages of benches/peers/requirements.txt: transformers + torch 2.11.0
# (for hf_generate.py) and xllamacpp, a prebuilt llama.cpp (for llamacpp_generate.py).
# Binary wheels only, nothing is compiled. About 2.8 GB of downloads (torch's CUDA
# dependencies make up most of it), ~5 GB on disk.
#
# Idempotent: a stamp holding the requirements' sha256 makes a re-run a no-op; after an
# edit of requirements.txt, or a failed install, a re-run brings the venv in line.
# If scripts/setup already fetched the pinned torch wheel into $CAIRN_HOME/wheels/torch,
# that copy is installed instead of downloading it again.
#
# The model is not fetched here: scripts/setup puts it at
# $CAIRN_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf.
#
# Usage: benches/peers/setup.sh            then e.g.
#        $CAIRN_HOME/venv-peers/bin/python benches/peers/hf_generate.py
#        $CAIRN_HOME/venv-peers/bin/python benches/peers/llamacpp_generate.py
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CAIRN_HOME="${CAIRN_HOME:-$HOME/.cache/cairn}"
VENV="${PEERS_VENV:-$CAIRN_HOME/venv-peers}"
REQ="$HERE/requirements.txt"
STAMP="$VENV/.peers-requirements.sha256"

say() { echo "peers-setup: $*" >&2; }
die() { echo "peers-setup: error: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is required"
python3 -c 'import venv, ensurepip' 2>/dev/null || die "python3's venv module is required (apt-get install python3-venv)"

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c 'import torch, transformers, gguf, xllamacpp' 2>/dev/null; then
  say "up to date: $VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" || die "cannot create venv $VENV"
fi
rm -f "$STAMP"

pip_install() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off \
    --only-binary=:all: "$@"
}

# Reuse the torch wheel scripts/setup already fetched (and checked against its sha256)
# when it is the pinned version: saves a 530 MB download.
torch_pin="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$REQ")"
py_tag="cp$("$VENV/bin/python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
cached=$(ls "$CAIRN_HOME"/wheels/torch/torch-"$torch_pin"-"$py_tag"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$cached" ] && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  say "installing torch from $cached"
  pip_install --no-deps "$cached" || die "installing $cached failed"
fi

say "installing pinned packages (binary wheels only; up to ~2.8 GB to download the first time)"
pip_install -r "$REQ" || die "pip install failed; re-run to retry"

"$VENV/bin/python" - <<'PY' || die "the installed packages do not import"
from importlib.metadata import version
import torch, transformers, gguf, xllamacpp
print(f"peers-setup: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"gguf {version('gguf')}, xllamacpp {xllamacpp.__version__}")
print("peers-setup: llama.cpp " + xllamacpp.get_system_info().strip())
PY
echo "$want" > "$STAMP"
say "ready: $VENV"
