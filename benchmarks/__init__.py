"""Benchmarks for fastapi-catga: ratios against raw clients measured side by side in one run.

Run them from the repository root, e.g. ``python -m benchmarks.bench_cluster`` (see README.md).
They are not timed tests and are not collected by pytest.
"""
