# `make serve` runs the server, `make test` the test suite; both set up everything on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL ?= ViT-B-32/datacomp_xl_s13b_b90k
HOST ?= 127.0.0.1
PORT ?= 8000
# Loopback without keys by default (logged as a warning); e.g. SERVE_AUTH="--api-key KEY" to require one.
SERVE_AUTH ?= --no-auth

.PHONY: install serve demo test lint bench

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: anything that pulls torch later is then satisfied and fetches no CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Test-only oracles. --no-deps: open_clip and clip-benchmark would pull a CUDA torchvision build.
	$(PIP) install -q --no-deps open_clip_torch==3.3.0 torchvision==0.28.0 clip-benchmark==1.6.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/clipserve serve --model $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_AUTH) $(ARGS)

demo: install
	$(VENV)/bin/clipserve demo --host $(HOST) --port $(PORT) $(ARGS)

# Debian's Chromium for the playground's browser tests (Playwright drives it; it never downloads a browser).
/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium

test: install /usr/bin/chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench

bench: install
	$(PY) bench/encode.py
