"""Benchmarks run by `make bench`: the overlay filesystems side by side, and convert vs chmod.

Not part of the installed package: run them from the repository root with
`python -m bench.overlay_bench` and `python -m bench.convert_bench` (as root).
"""
