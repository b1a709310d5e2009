#!/usr/bin/env bash
# Builds a separate virtual environment holding circuit-tracer 0.5.0, for the
# cross-check tests (tests/test_circuit_tracer_equality.py) and the benchmark's
# --circuit-tracer option. It is separate because circuit-tracer needs
# TransformerLens 2.x (HookedTransformer) and transformers 4.x, while
# tc_explore runs on TransformerLens 4.x and transformers 5.x.
#
# It also puts, in VENV_DIR/viewer-js, the JavaScript libraries circuit-tracer's
# local viewer loads from CDNs, fetched with npm: dagre, pako, and d3 v7 with
# d3-jetpack bundled by esbuild into one global `d3` (d3-jetpack's own d3v7 bundle
# patches a second copy of d3-selection; scripts/circuit_tracer_viewer_js/), so
# that tests/test_circuit_tracer_viewer.py opens the viewer offline.
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
VIEWER_JS=("d3@7.9.0" "d3-jetpack@2.3.0" "dagre@0.8.5" "pako@2.1.0" "esbuild@0.25.12")
JS_SRC="$(cd "$(dirname "$0")" && pwd)/circuit_tracer_viewer_js"
WANT="torch==2.13.0 ${REQUIREMENTS[*]} ${VIEWER_JS[*]} $(cat "$JS_SRC"/*.js | sha256sum | cut -c1-16)"

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
JS_DIR="$VENV_DIR/viewer-js"
command -v npm >/dev/null || { echo "make_circuit_tracer_env.sh: npm is needed to fetch the JavaScript of circuit-tracer's viewer (d3, d3-jetpack, dagre, pako)" >&2; exit 1; }
rm -rf "$JS_DIR" && mkdir -p "$JS_DIR/src"
cp "$JS_SRC"/*.js "$JS_DIR/src/"
# one d3-selection and d3-transition (3.x) for d3 and d3-jetpack alike
echo '{"private": true, "overrides": {"d3-selection": "3.0.0", "d3-transition": "3.0.1"}}' > "$JS_DIR/package.json"
(cd "$JS_DIR" && npm install --silent --no-audit --no-fund "${VIEWER_JS[@]}" >/dev/null &&
 node_modules/.bin/esbuild src/d3_with_jetpack.js --bundle --format=iife --log-level=warning \
   --alias:d3-selection=./src/d3_selection_v3_with_event.js --outfile=d3-jetpack-bundle.js)
echo "$WANT" > "$STAMP"
