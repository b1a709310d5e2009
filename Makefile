# One command to set everything up and run the main job (`make demo`), one to
# set everything up and pass the tests (`make test`). Each creates .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo gpt2 gpt2-fixture demo-model benchmarks benchmark-table clean circuit-tracer

# torch is installed first, pinned, so that installing tc_explore keeps it. Which
# build pip picks depends on its configured indexes: from plain PyPI,
# torch==2.13.0 on Linux is the CUDA build (about 20 nvidia-* packages, several GB).
# For the CPU-only build use PyTorch's CPU index:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Where pip is configured with a local wheel directory holding the CPU wheel (as
# on this project's CI machines), the default line takes that wheel.
TORCH_INDEX_URL ?=

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	# setuptools warns (UserWarning) that an editable install of a package with mapped
	# directories uses a meta path finder; that is expected here, so it is not shown.
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# circuit-tracer 0.5.0 in an environment of its own (it needs TransformerLens 2
# and transformers 4): tests/test_circuit_tracer.py compares our attribution
# graphs with its, and benchmarks/bench_attribution.py --circuit-tracer times it.
# The script does nothing when the environment is already there.
CT_VENV ?= .ctvenv
circuit-tracer:
	PYTHON=$(PYTHON) TORCH_INDEX_URL=$(TORCH_INDEX_URL) scripts/make_circuit_tracer_env.sh $(CT_VENV)

# The unit/integration tests, the browser tests and the four notebooks
# (executed with nbval on the offline demo model) in one pytest run. The
# circuit-tracer comparison must run here (not skip): TC_EXPLORE_REQUIRE_CIRCUIT_TRACER.
test: $(STAMP) circuit-tracer
	mkdir -p artifacts/nbval
	TC_EXPLORE_DEMO=1 TC_EXPLORE_OUT=$(CURDIR)/artifacts/nbval TC_EXPLORE_REQUIRE_CIRCUIT_TRACER=1 \
		TC_EXPLORE_CIRCUIT_TRACER_PYTHON=$(abspath $(CT_VENV))/bin/python \
		$(BIN)/python -m pytest -q tests notebooks --nbval-lax

# The main job: the four notebooks end to end on the demo models, offline;
# executed notebooks and their HTML land in artifacts/notebooks/.
demo: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py --out artifacts/notebooks

# The three GPT-2 notebooks (not another_model, which is Gemma-2-2B) on GPT-2 small
# with the paper's gpt2-small transcoders.
# The first run downloads GPT-2, the 12 transcoder files and an OpenWebText slice
# into the Hugging Face cache (README: "GPT-2 small"); later runs read the cache.
# Results land in $(GPT2_OUT).
GPT2_OUT ?= artifacts/notebooks-gpt2
GPT2_NOTEBOOKS ?=
gpt2: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py --gpt2 --out $(GPT2_OUT) $(GPT2_NOTEBOOKS)

# `make gpt2` end to end without the Hub: the same command against a tiny
# offline stand-in in GPT-2's exact formats (tc_explore.testing.build_gpt2_notebook_hub:
# a GPT-2-architecture model served as `gpt2`, pchlenski/gpt2-transcoders files,
# an OpenWebText-like slice), through HF_HOME. Its numbers mean nothing; it checks
# the path. Results land in artifacts/notebooks-gpt2-fixture/. The greater-than
# notebook is left out: on GPT-2 it reads the paper's feature 5315 of MLP10,
# which a 64-feature fixture does not have (and wider random transcoders fire
# too densely to attribute in this machine's memory).
GPT2_FIXTURE_HF ?= artifacts/gpt2-fixture-hf
gpt2-fixture: $(STAMP)
	$(BIN)/python -c "from tc_explore.testing import build_gpt2_notebook_hub as b; b('$(GPT2_FIXTURE_HF)')"
	HF_HOME=$(abspath $(GPT2_FIXTURE_HF)) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(MAKE) gpt2 GPT2_OUT=artifacts/notebooks-gpt2-fixture GPT2_NOTEBOOKS="walkthrough feature_dashboards"

demo-model: $(STAMP)
	$(BIN)/python -m tc_explore.demo build

# Each bench script prints its figures; with --record it also writes them into
# benchmarks/results.json and regenerates the README's tables (RECORD=--record).
benchmarks: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py $(RECORD)
	$(BIN)/python benchmarks/bench_trace.py $(RECORD)

# The README's benchmark tables, regenerated from benchmarks/results.json.
benchmark-table: $(STAMP)
	$(BIN)/python scripts/benchmark_table.py

clean:
	rm -rf $(VENV) $(CT_VENV) artifacts
