#!/usr/bin/env bash
# Builds a separate virtual environment holding circuit-tracer 0.5.0, for the
# cross-check tests (tests/test_circuit_tracer_equality.py) and the benchmark's
# --circuit-tracer option. It is separate because circuit-tracer needs
# TransformerLens 2.x (HookedTransformer) and transformers 4.x, while
# tc_explore runs on TransformerLens 4.x and transformers 5.x.
#
# usage: scripts/make_circuit_tracer_env.sh [VENV_DIR]   (default: .ctvenv)
# Environment: PYTHON (default python3), TORCH_INDEX_URL (as in the Makefile).
# Re-running is cheap: a stamp file records what was installed.
set -euo pipefail

VENV_DIR="${1:-.ctvenv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV_DIR/.circuit_tracer_installed"
# torch is pinned first so that circuit-tracer's "torch>=2.0" keeps it; the
# TransformerLens range is the one with HookedTransformer that circuit-tracer
# 0.5.0 imports; transformers' range is circuit-tracer's own.
REQUIREMENTS=(
  "circuit-tracer==0.5.0"
  "transformer-lens>=2.16,<3"
  "transformers>=4.56,<=4.57.3"
  "huggingface-hub<1.0"
  "pydantic>=2"
  # TransformerLens 2.x needs numpy<2; pyarrow (through datasets) from 21 on needs numpy>=2.
  "pyarrow<21"
)
WANT="torch==2.13.0 ${REQUIREMENTS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
# pip's notes about configured local indexes that lack a package are noise here.
quiet() { "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2); }
"$PYTHON" -m venv "$VENV_DIR"
quiet "$VENV_DIR/bin/python" -m pip install -q --upgrade pip
quiet "$VENV_DIR/bin/python" -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
quiet "$VENV_DIR/bin/python" -m pip install -q "${REQUIREMENTS[@]}" torch==2.13.0
"$VENV_DIR/bin/python" -c "import circuit_tracer, transformer_lens; from transformer_lens import HookedTransformer"
echo "$WANT" > "$STAMP"
