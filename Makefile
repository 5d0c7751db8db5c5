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

.PHONY: env java repro test plots-template restore
env: $(VENV)/.installed .dvc/plots_offline.html

# The caption metrics run Java tools (PTBTokenizer, METEOR): say so before any long work.
java:
	@command -v java >/dev/null || { echo "make: Java is needed for the caption metrics \
	(PTBTokenizer, METEOR): install a JRE, e.g. apt-get install default-jre-headless" >&2; exit 1; }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

# `dvc plots show` pages with Vega inlined, which render offline (needs npm; without it the
# pages load Vega from a CDN, and `dvc plots show --json` still works)
plots-template: .dvc/plots_offline.html
.dvc/plots_offline.html: scripts/vega/package-lock.json scripts/plots_template.sh $(VENV)/.installed
	bash scripts/plots_template.sh || echo "make: offline plot pages not set up (see above)" >&2

repro: java env
	dvc repro

# DVC deletes a stage's outputs before running it: after a stage stopped (bad input, killed),
# this brings back what the last completed run wrote: the files git tracks that are now deleted
# (metrics, curves), then the cached outputs that dvc.lock names (a failed run leaves it as was).
# An output that differs from its dvc.lock version (a corrupt feature file) is replaced by it.
restore:
	git ls-files -z --deleted | xargs -0 -r git checkout --
	dvc checkout --force

test: java env
	python -m pytest -q --durations=15 tests

# --- hand-in (issue 22) ---
#   make handin URL=https://host/path/release.tar.gz   pack handin/release.tar.gz (+ .sha256) from
#        release/ and set hw3_download.sh's RELEASE_URL / RELEASE_SHA256 (no URL: the sha256 only)
#   make pull-release     our own machines: release/ from the DVC remote, then the pretrained weights
#   make grading-check    hw3_download.sh, hw3_1.sh, hw3_2.sh as the TAs run them, in a Python 3.8 /
#        torch 1.12.1 venv (GRADING_ENV, built when missing), compared with PIPELINE's predictions;
#        GRADING_SOURCE=worktree checks uncommitted changes too (scripts/grading_check.sh)
GRADING_ENV ?= .grading_env
PIPELINE ?= $(CURDIR)
GRADING_SOURCE ?= clone
.PHONY: handin pull-release grading-env grading-check
handin: env
	python -m stages.handin $(if $(URL),--url '$(URL)')

pull-release: env
	dvc pull select demo_clip  # demo_clip: the demo world's CLIP, which hw3_1.sh loads there
	HF_HUB_OFFLINE=0 bash scripts/run_module.sh stages.hw3_prefetch

grading-env: $(GRADING_ENV)/bin/python3
$(GRADING_ENV)/bin/python3:
	bash scripts/grading_env.sh $(GRADING_ENV)

grading-check: java env grading-env
	GRADING_ENV='$(abspath $(GRADING_ENV))' PIPELINE='$(PIPELINE)' GRADING_SOURCE='$(GRADING_SOURCE)' \
	PROJECT_PYTHON='$(abspath $(BIN))/python' bash scripts/grading_check.sh

# --- scale-out (issue 24) ---
#   make remote REMOTE=/mnt/shared/hw3-dvc   a folder every machine mounts (or s3://, gs://,
#        ssh://, with that DVC plugin installed) becomes the default DVC remote in .dvc/config:
#        commit it, and every clone pushes and pulls there; REMOTE_SCOPE=--local keeps it to this
#        clone (.dvc/config.local), e.g. when the folder is mounted at another path on each machine
#   make push    dvc push: every output DVC caches (features, checkpoints, predictions, release)
#   make pull    dvc pull, then dvc status: another machine's outputs, nothing re-run
#   Several processes: params train/extract/decode.nproc_per_node, or torchrun (README: Scale-out)
REMOTE_NAME ?= shared
REMOTE_SCOPE ?=
.PHONY: remote push pull
remote: env
	@test -n '$(REMOTE)' || { echo "make remote: name the storage, e.g. make remote \
	REMOTE=/mnt/shared/hw3-dvc (a folder), s3://bucket/hw3, gs://bucket/hw3, ssh://host/path" >&2; exit 1; }
	dvc remote add $(REMOTE_SCOPE) --default --force $(REMOTE_NAME) '$(REMOTE)'
	@echo "make remote: DVC remote '$(REMOTE_NAME)' = $(REMOTE) (default$(if $(REMOTE_SCOPE), $(REMOTE_SCOPE)))"

push: env
	dvc push

pull: env
	dvc pull
	dvc status
