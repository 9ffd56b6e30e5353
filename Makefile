# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 (CPU build) first, then medadv with its extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Here the CPU wheel lies in pip's find-links; elsewhere take torch from PyTorch's CPU index so
# pip never resolves a multi-GB CUDA build.
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-2.13.0*),,--index-url https://download.pytorch.org/whl/cpu)
# The data root: ../shared/data when it sits beside the checkout, else MEDADV_DATA or the user cache.
ifneq ($(wildcard ../shared/data),)
export MEDADV_DATA ?= $(abspath ../shared/data)
endif

.PHONY: demo test test-fast lint docs install clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/medadv demo

# Two worker processes of one torch thread each (pytest-xdist), a file whole in one worker (its module
# fixtures built once); the model a dozen files share is trained first, on every core (tests/conftest.py).
PARALLEL := -n 2 --dist loadfile
test: install lint
	$(BIN)/python -m pytest -q -ra $(PARALLEL)

# The inner loop: no training, no studies (tests marked slow).
test-fast: install lint
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PARALLEL)

# Lint and type checks (configured in pyproject.toml): ruff on the code and tests, mypy on medadv/.
lint: install
	$(BIN)/ruff check medadv tests bench
	$(BIN)/mypy

# The API site from the docstrings (mkdocs.yml, mkdocstrings), strict: a broken reference fails the build.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

docs: $(BIN)/.docs-installed
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis .mypy_cache .ruff_cache
