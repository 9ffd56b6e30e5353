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

.PHONY: demo test test-fast install clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/medadv demo

test: install
	$(BIN)/python -m pytest -q -ra

# The inner loop: no training, no studies (tests marked slow, see tests/conftest.py).
test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
