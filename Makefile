# spinegrade: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= demo_run

.PHONY: setup test demo lint format bench clean serve-deps mutate

setup: $(VENV)/.installed

# The venv is rebuilt when the dependency list or the pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q

# Switch off each mechanism the suite claims to test, one at a time, and show the suite goes red
# (bench/mutate.py; a scratch copy, the checkout is never touched; ~15 min on 2 cores).
mutate: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/mutate.py

# System packages for the serve tests (Orthanc, DICOMweb plugin, Chromium); needs root.
serve-deps:
	scripts/install-serve-deps.sh

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/spinegrade demo --out $(DEMO_DIR)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
