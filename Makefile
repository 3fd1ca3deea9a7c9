# Two-command set-up: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow test-all test-browser demo data clean gpu-check

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

# The prepared GPU check (benchmarks/gpu_check.py): the machine's own torch, nothing installed (a GPU
# machine may reach no package registry); the venv's python when there is one. DEVICE=cpu dry-runs it.
CHECK_PY := $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))

gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(CHECK_PY) benchmarks/gpu_check.py

# the explorer in a real headless Chromium (Debian's chromium + chromium-driver; the screenshot is
# kept in tests/.artifacts/)
test-browser: $(STAMP)
	$(PY) -m pip install --quiet -e ".[browser]"
	$(PY) -m pytest -q -m browser

demo: $(STAMP)
	$(VENV)/bin/probe demo

# Fashion-MNIST from Debian's dataset-fashion-mnist, in /usr/share/datasets/fashion-mnist (searched by
# default): installed when run as root, otherwise the command to run is printed.
FASHION_DIR := /usr/share/datasets/fashion-mnist
FASHION_FILES := $(addprefix $(FASHION_DIR)/,train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
	t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
APT_INSTALL := apt-get install -y --no-install-recommends dataset-fashion-mnist

data:
	@if ls $(FASHION_FILES) >/dev/null 2>&1; then \
		echo "fashion-mnist: already in $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		$(APT_INSTALL) || { apt-get update && $(APT_INSTALL); }; \
	else \
		echo "fashion-mnist: run as root: $(APT_INSTALL)  (or: sudo make data)"; exit 1; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
