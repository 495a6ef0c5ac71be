# One-command set-up. `make quickstart` and `make test` create/refresh .venv themselves.
PYTHON      ?= python3
VENV        ?= .venv
# CPU build by default (ships on the dev/CI machines; a plain `torch` pulls a multi-GB CUDA build).
# On a GPU machine:  make install TORCH_SPEC=torch   (or a CUDA build from your index)
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
QS          ?= quickstart-out
QS_STEPS    ?= 1500

.PHONY: install quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

# Trains the CPU `tiny` preset on scikit-learn's bundled digits (no download), evaluates it,
# writes samples and reconstructions. Re-running resumes/reuses the run in $(QS)/run.
quickstart: $(STAMP)
	$(BIN)/vdvl presets
	$(BIN)/vdvl model --preset tiny --data digits
	$(BIN)/vdvl train --preset tiny --data digits --run-dir $(QS)/run --steps $(QS_STEPS) --set train.log_every=100
	$(BIN)/vdvl eval $(QS)/run --data digits --split test --iw 16
	$(BIN)/vdvl sample $(QS)/run --n 64 --temperature 0.9 --out $(QS)/samples.png
	$(BIN)/vdvl reconstruct $(QS)/run --data digits --split test --n 32 --out $(QS)/reconstructions.png
	@echo
	@echo "quickstart outputs in $(QS)/: run/ (config.toml, checkpoints/, metrics.jsonl), samples.png, reconstructions.png"

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(QS)
