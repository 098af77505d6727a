# One entry point for set-up, the built-in main job and the tests. Every target installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install train test test-fast clean

$(BIN)/denserc: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/denserc

train: install
	$(BIN)/denserc train

test: install
	$(BIN)/python -m pytest -q

test-fast: install  # everything but the tests marked slow: well under a minute, for development
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
