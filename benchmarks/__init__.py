"""Benchmarks of loraplug against PEFT: ``python -m benchmarks [--quick]``."""
