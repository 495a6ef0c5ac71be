# One-command set-up. `make quickstart` and `make test` create/refresh .venv themselves.
PYTHON      ?= python3
VENV        ?= .venv
# CPU build by default (ships on the dev/CI machines; a plain `torch` pulls a multi-GB CUDA build).
# On a GPU machine:  make install TORCH_SPEC=torch   (or torch==2.13.0 with your CUDA index)
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed

.PHONY: install quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m examples.quickstart

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) .quickstart
