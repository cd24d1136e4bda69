PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install system-deps lint test demo bench clean

# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
install: system-deps
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,web]'

# System tools that only the tests' oracles need (a C++ compiler for the llama.cpp probes, Go for
# Ollama's text/template, Debian's Chromium for the chat page's browser test, curl for the README's
# request examples). Installed with apt-get when run as root; otherwise the missing ones are named.
SYSTEM_TOOLS := g++:g++ go:golang-go chromium:chromium curl:curl
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing test tools:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "note: the test oracles also need:$$missing (install them with your package manager)"; \
	fi

# ruff: lint rules and formatting as configured in pyproject.toml ([tool.ruff])
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test:
	$(PYTHON) -m pytest -q tests

demo:
	$(PYTHON) -m minicpmv.cli.demo demo-out

bench:
	$(PYTHON) -m bench $(BENCH_ARGS)

clean:
	rm -rf demo-out .cache build *.egg-info test-artifacts
