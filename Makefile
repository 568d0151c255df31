# The two set-up commands of the README. Each works on a fresh machine with Python 3.11:
#   make demo   install into .venv, then run the whole workflow on the synthetic cohort (2 cores)
#   make test   install into .venv (and a single-node SLURM from Debian's packages), place the test data
#               (make testdata), then run the tests
#   make testdata   the real test data, SHA-256 checked, in $HNCT_TESTDATA (default ~/.cache/hnct/testdata):
#               copied from ../shared beside the clone when present, else downloaded from public sources
# torch is pinned to 2.13.0 (a CPU wheel here; on a GPU node conda's env/train.yaml brings CUDA).

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
PY := $(VENV)/bin/python
# Rules call `python -m hnct.<stage>`: the venv's python must come first on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)
STAMP := $(VENV)/.hnct-installed

.PHONY: install demo report test test-fast testdata slurm clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[workflow,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores $(CORES)
	$(VENV)/bin/snakemake --report report.html

slurm:
	bash tests/slurm/install.sh

# PYTHONPATH: this clone's hnct and manifest, even when the venv's editable install points elsewhere.
testdata: $(STAMP)
	PYTHONPATH=$(CURDIR)/workflow $(PY) -m hnct.testdata fetch

test: $(STAMP) slurm testdata
	$(PY) -m pytest --durations=40

test-fast: $(STAMP) testdata
	$(PY) -m pytest -m "not slurm and not slow"

clean:
	rm -rf results logs .snakemake report.html report.zip
