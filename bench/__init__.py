"""pgseal benchmark suite: `python -m bench` runs it; BENCHMARKS.md reports it."""
