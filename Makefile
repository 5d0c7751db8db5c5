# Two entry points from a fresh clone:
#   make repro   create the environment, then run the whole pipeline (`dvc repro`) on the demo world
#   make test    create the environment, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1

.PHONY: env repro test
env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

repro: env
	dvc repro

test: env
	python -m pytest -q tests
