"""Benchmarks: one module per topic, each with ``main(argv)`` printing figures measured side by side."""
