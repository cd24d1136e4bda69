"""Side-by-side benchmarks against llama.cpp (`python -m bench`, `make bench`). Not installed."""
