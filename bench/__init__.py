"""Performance benchmarks of alphaspin: each is ``python -m bench.<name>`` (see bench/README.md)."""
