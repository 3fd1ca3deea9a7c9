# Two-command set-up: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow test-all test-browser demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned torch first: an unpinned one would pull the CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

# the explorer in a real headless Chromium (Debian's chromium + chromium-driver; the screenshot is
# kept in tests/.artifacts/)
test-browser: $(STAMP)
	$(PY) -m pip install --quiet -e ".[browser]"
	$(PY) -m pytest -q -m browser

demo: $(STAMP)
	$(VENV)/bin/probe demo

clean:
	rm -rf $(VENV) build *.egg-info
