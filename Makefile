# Two entry points, each sets everything up from nothing: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export GSAFE_HOME ?= $(CURDIR)/.gsafe

.PHONY: demo test setup browser bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Headless Chromium and its WebDriver for the gallery's and the review app's browser tests (Debian
# packages; the tests are skipped where apt is absent).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "make: chromium / chromium-driver not installed; the browser tests will be skipped"; }

demo: $(STAMP)
	$(BIN)/gsafe demo --out demo_out

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .gsafe demo_out .pytest_cache
