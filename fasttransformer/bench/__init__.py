"""Benchmarks behind ``python -m fasttransformer bench`` (and benchmarks/bench_*.py): each subject
module has ``sweep(device, quick) -> record`` and ``markdown(record) -> str``."""
