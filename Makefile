# Tally: every target installs what it needs first, so each works on a fresh clone.
# The newest python3.x (3.11 or later) on PATH that runs; PYTHON=... overrides it.
ifndef PYTHON
PYTHON := $(shell for v in 3.14 3.13 3.12 3.11 3; do \
	python$$v -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
	&& { echo python$$v; break; }; done)
endif
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench faults soak schemas dev-up dev-down clean

install: $(STAMP)

# constraints.txt pins every dependency (the lock); refresh it with `make lock`.
# The test kit (testkit/: the Stripe double, package stripe_testkit) is installed here,
# beside the dev extra: a PEP 508 extra cannot name a local path portably, so `.[dev]`
# cannot pull it in, and a runtime install (`pip install .`) never has it.
$(STAMP): pyproject.toml testkit/pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "need Python 3.11 or newer on PATH (python3.11 ... python3.14)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e ./testkit -e '.[dev]'
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/pip freeze --disable-pip-version-check | grep -v '^-e' | grep -v '^#' | grep -v '^tally\(-testkit\)\?==' > constraints.txt

demo: install
	$(BIN)/tally demo

test: install
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# promtool and amtool for tests/deploy (`promtool check/test rules`, `amtool check-config`):
# Debian's prometheus and prometheus-alertmanager packages, installed only when missing.
.PHONY: tools
tools:
	@command -v promtool >/dev/null && command -v amtool >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends prometheus prometheus-alertmanager; }

test: tools
test-fast: tools

# The Stripe contract suite against Stripe test mode (it runs against the double in `make
# test`): needs STRIPE_API_KEY=sk_test_...; every request is also checked against Stripe's
# OpenAPI document by a recording proxy. Creates customers, meters and invoices there.
.PHONY: test-stripe
test-stripe: install
	@case "$$STRIPE_API_KEY" in sk_test_*) ;; \
	  *) echo "make test-stripe needs STRIPE_API_KEY=sk_test_... (a test-mode key)"; exit 2;; esac
	TALLY_STRIPE_TARGET=stripe $(BIN)/pytest -q -m "stripe_contract and not double_only" \
	  tests/stripe_testkit tests/billing_jobs

test-fast: install
	$(BIN)/pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

# Reliability (README): every fault of issue 17 injected while traffic flows, then the books
# (bench/faults.py, ~10 min; exits 1 if a row fails), and a long steady run watching memory
# and lag (bench/soak.py; MINUTES=N to change the default 10). Both write bench/results/.
faults: install
	$(BIN)/python -m bench.faults

soak: install
	$(BIN)/python -m bench.soak $(if $(MINUTES),--minutes $(MINUTES))

schemas: install
	$(BIN)/python -m schemas.export

dev-up: install
	$(BIN)/tally dev up

dev-down: install
	$(BIN)/tally dev down

clean:
	rm -rf $(VENV) .tally .pytest_cache .mypy_cache .ruff_cache
