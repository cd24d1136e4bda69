"""Side-by-side benchmarks against llama.cpp (`python -m bench.run`, `make bench`). Not installed."""
