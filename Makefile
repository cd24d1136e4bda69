PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test demo bench clean

# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,web]'

test:
	$(PYTHON) -m pytest -q tests

demo:
	$(PYTHON) -m minicpmv.cli.demo demo-out

bench:
	$(PYTHON) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf demo-out .cache build *.egg-info test-artifacts
