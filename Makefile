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
# The suite on every core (pytest-xdist; each test file stays on one worker, with its module fixtures).
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= auto

.PHONY: install quickstart test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

# The whole mission on scikit-learn's bundled digits (no download): train the CPU preset,
# analyse KL, encode the active 3%, decode, probe, print one summary table and write
# $(QS)/report.html (all of it on one page).
quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py --out $(QS) --steps $(QS_STEPS)

# The layer contract (pyproject.toml, [tool.importlinter]) is checked by the suite itself
# (tests/test_architecture.py runs lint-imports), in parallel with the other tests.
# Bytecode caching on even where the environment turns it off (PYTHONDONTWRITEBYTECODE=1): the suite
# starts about a hundred Python processes, and without .pyc files each recompiles the package and
# pytest re-rewrites every test module's asserts (0.35 s and 2 s a process on a 2-core machine).
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(QS)
