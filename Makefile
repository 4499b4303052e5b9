# make run  : create .venv, install onebox, train the tiny preset on Shakespeare, export, sample.
# make test : the same .venv plus dev extras, then the whole test suite.
# make lint : ruff's linter and formatter check (what .ci/run runs before the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_INDEX := https://download.pytorch.org/whl/cpu
# Without a GPU, pin the CPU build of torch; use PyTorch's CPU index only when it can be reached.
ifeq ($(HAS_GPU),1)
PIP_TORCH :=
RUN_FLAGS ?= --max-steps 1000 --batch-size 32
else
PIP_TORCH = -c constraints-cpu.txt $(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/torch/', timeout=3); print('--extra-index-url $(CPU_INDEX)')" 2>/dev/null)
RUN_FLAGS ?=
endif
RUN_DIR ?= runs/tiny

.PHONY: install dev run test lint clean

install: $(VENV)/.installed
dev: $(VENV)/.dev

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_TORCH) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(PIP_TORCH) -e '.[dev]'
	touch $@

# make run replaces only a run folder it wrote itself (marked by .written-by-make-run), never one of yours.
run: install
	@if [ -e $(RUN_DIR) ] && [ ! -e $(RUN_DIR)/.written-by-make-run ]; then \
	  echo "$(RUN_DIR) exists and was not written by make run: move it aside, or give another folder (make run RUN_DIR=runs/demo)."; exit 1; fi
	rm -rf $(RUN_DIR)
	mkdir -p $(RUN_DIR) && touch $(RUN_DIR)/.written-by-make-run
	$(BIN)/onebox train --config configs/tiny-shakespeare.toml --out-dir $(RUN_DIR) $(RUN_FLAGS)
	$(BIN)/onebox export $(RUN_DIR) $(RUN_DIR)/hf
	$(BIN)/onebox generate $(RUN_DIR)/hf --prompt "ROMEO:" --max-new-tokens 120 --seed 1

test: dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
