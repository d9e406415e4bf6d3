# Tally: every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench schemas dev-up dev-down clean

install: $(STAMP)

# constraints.txt pins every dependency (the lock); refresh it with `make lock`.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/pip freeze --disable-pip-version-check | grep -v '^-e' | grep -v '^tally==' > constraints.txt

demo: install
	$(BIN)/tally demo

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

schemas: install
	$(BIN)/python -m schemas.export

dev-up: install
	$(BIN)/tally dev up

dev-down: install
	$(BIN)/tally dev down

clean:
	rm -rf $(VENV) .tally .pytest_cache .mypy_cache .ruff_cache
