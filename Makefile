# Two entry points from a fresh clone:
#   make repro   create the environment, then run the whole pipeline (`dvc repro`) on the demo world
#   make test    create the environment, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
# offline unless you set it (a real-world first run may need to download pretrained weights)
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE

.PHONY: env java repro test
env: $(VENV)/.installed

# The caption metrics run Java tools (PTBTokenizer, METEOR): say so before any long work.
java:
	@command -v java >/dev/null || { echo "make: Java is needed for the caption metrics \
	(PTBTokenizer, METEOR): install a JRE, e.g. apt-get install default-jre-headless" >&2; exit 1; }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

repro: java env
	dvc repro

test: java env
	python -m pytest -q tests
