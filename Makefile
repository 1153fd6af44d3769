# Each target is self-contained: it creates (or reuses) .venv, installs the pinned stack, and runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# XLA:CPU maps a fresh temporary buffer (hundreds of MB for a UNet step) on every call; glibc's
# hugetlb tunable backs it with transparent huge pages (where THP is in madvise mode), which took the
# SD2-shaped UNet's forward + text gradient 8% faster on the 2-core machine (bench/README.md, "Huge
# pages"). Read at process start, so it is set here for every target; an existing setting wins.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
# That buffer is still mapped and zeroed by the kernel afresh on every call: glibc serves blocks over
# 64 MB asked for by a thread other than the main one with mmap, whatever its tunables say, and unmaps
# them on free. gperftools' tcmalloc keeps them for the next call (16% of the CPU time went to the
# kernel's page clearing; bench/README.md, "The allocator"), so every target preloads it where it is
# installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`). `make TCMALLOC= ...` runs without.
TCMALLOC ?= $(firstword $(wildcard $(foreach d,/usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu \
              /usr/lib64 /usr/lib /usr/local/lib,$(d)/libtcmalloc_minimal.so.4)))
ifneq ($(strip $(TCMALLOC)),)
export LD_PRELOAD := $(strip $(TCMALLOC) $(LD_PRELOAD))
# tcmalloc reports every allocation above 1 GB on stderr; a CPU step at real scale makes several.
export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD ?= 68719476736
endif

.PHONY: install demo ablations ablations-reduced test test-slow test-all clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(STAMP)

## The main job: the end-to-end demo (see README).
demo: install
	HF_HUB_OFFLINE=1 $(PY) -m projects.miniworld.demo --workdir workdirs/demo

## The paper's ablations in the miniature world (docs/ablations.md): ~8 h on 2 cores for the whole
## table; resumable: run it again after any stop. ABLATIONS=tokens (or a comma-separated list) for one family.
## Runs already in the committed docs/ablations/ablations.json are taken as done; the tables and plots
## are published back there.
ABLATIONS ?= all
PUBLISHED := docs/ablations
ablations: install
	HF_HUB_OFFLINE=1 $(PY) -m projects.miniworld.ablations --family $(ABLATIONS) --workdir workdirs/ablations \
	  $(if $(wildcard $(PUBLISHED)/ablations.json),--import $(PUBLISHED)/ablations.json) --publish $(PUBLISHED)

## The same pipeline at toy size (two settings, 8 steps, 8 scenes): a few minutes.
ablations-reduced: install
	HF_HUB_OFFLINE=1 $(PY) -m projects.miniworld.ablations --family punctuation --seeds 0 --reduced \
	  --workdir workdirs/ablations_reduced

## The default test run (< 20 min on 2 cores): everything but tests marked slow.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Tests marked slow (2-process training run, evaluate CLI with tfds + Inception, world VAE and decoder
## pre-training runs); .ci/run runs them.
test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "slow" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

test-all: test test-slow

clean:
	rm -rf $(VENV) workdirs .pytest_cache
