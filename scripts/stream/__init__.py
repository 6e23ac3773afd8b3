"""The pieces of ``scripts.bench_stream``: the API process, SSE clients, measurement windows, checks and report."""
