"""Benchmarks of peft-lorsu: cost (perf) and accuracy; run with ``python -m benchmarks.<name>``."""
