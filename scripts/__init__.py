"""Benchmarks and chaos sessions, each run as a module from the repository root: ``python -m scripts.bench``.

``scripts.harness`` holds what they share (private Redis and workers, ``/proc`` and Redis probes, statistics, the
command line, reports); ``scripts.steps`` the step functions and raw Celery tasks their workers import. This package
is not installed with the product: it runs from a checkout.
"""
