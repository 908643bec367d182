# Thin wrappers; each target says what it runs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every stage folder, in numeric order (stage_10 after stage_9): a new stage joins by existing.
STAGES := $(shell ls -d stage_* | sort -V)

.PHONY: help demo test lint pytest check forward ladder-check ladder-record docs serve-docs bench nat-lab clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo:  ## the stage 22 tunnel and its inspector (the most complete stage), all on this machine (needs Python 3.11+ and openssl)
	$(PYTHON) -m stage_22

# The virtualenv is (re)built from pyproject.toml's extras whenever that file changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	touch $@

test: lint pytest docs  ## everything CI checks: lint, types, the tests, the strict docs build

lint: $(VENV)/.installed  ## ruff (lint + format), mypy --strict over the stages and tools, the structure lint, the ladder check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(STAGES) tools
	$(BIN)/python -m tools.imports
	$(BIN)/python -m tools.ladder check

# Four test workers per core, eight at most: most tests wait on sockets, shaped links and timers, not on
# the CPU (on 2 cores, 20 stages, 2,888 tests: 451 s with 6 workers, 423 s with 8; 16 stages, 2,549
# tests: 498 s with 4 workers at 53% CPU, 398 s with 6; 8 stages: 504 s with 2, 274 s with 4).
# worksteal: a worker that runs out takes tests from a busy one, so the minute-long tests don't leave
# the end of the run to one worker.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n * 4 > 8 ? 8 : n * 4 )))

# The second run: the tests of the stages that have --loop (22 on) again, on uvloop (conftest.py's --loop;
# skipped, with the reason, where uvloop is not installed).
pytest: $(VENV)/.installed  ## the test suite, WORKERS at once, then stage 22's again on uvloop (pytest exits non-zero when it collects no tests)
	$(BIN)/pytest -n $(WORKERS) --dist worksteal
	$(BIN)/pytest -n $(WORKERS) --dist worksteal --loop uvloop

check: $(VENV)/.installed  ## check your copy of a stage with every test of that stage: make check STAGE=3 DIR=../my_stage_3
	$(BIN)/python -m tests.check $(STAGE) $(DIR)

# A fix is written once (ladder/README.md): edit stage N, then carry the change into every later stage.
forward:  ## merge your edit of stage N into every later stage and re-record the ladder: make forward STAGE=N
	$(if $(STAGE),,$(error make forward needs the stage you edited: make forward STAGE=N))
	$(PYTHON) -m tools.ladder forward $(STAGE)

ladder-check:  ## fail when a stage no longer matches the recorded ladder (a later stage lacks a fix)
	$(PYTHON) -m tools.ladder check

ladder-record:  ## re-record every step of the ladder (after a change meant for one stage only)
	$(PYTHON) -m tools.ladder record

docs: $(VENV)/.installed  ## build the docs site into site/ (strict: a warning fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

serve-docs: $(VENV)/.installed  ## serve the docs with live reload on http://127.0.0.1:8001 (8000 is the pages' local app)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

bench: $(VENV)/.installed  ## benchmarks: direct, socat, ssh -R, stages 0, 3, 8, 13, 16, 22 on both loops (see bench/README.md; issue 26: python3 -m bench --speed; issue 25: python3 -m bench --tls-tunnel)
	$(BIN)/python -m bench

nat-lab:  ## the NAT lab story on real network namespaces (needs root)
	$(PYTHON) -m tests.nat_lab

clean:  ## remove the virtualenv and build output
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
