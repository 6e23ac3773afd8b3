"""What every benchmark shares, one module per concern.

- ``cli``: the common command line (``--quick``, ``--json``, worker options) and running as a module or a file;
- ``lifecycle``: a private ``redis-server`` and real worker processes, stopped on exit, Ctrl-C, SIGTERM and SIGHUP;
- ``probes``: CPU, memory and descriptors from ``/proc``; ``INFO`` commandstats, memory and clients from Redis;
- ``stats``: quantiles, medians and latency summaries;
- ``records``: the start and end times raw Celery tasks append to per-process files (the raw baseline's clock);
- ``runs``: submitting in bursts and waiting for runs, with deadlines;
- ``report``: tables, number formatting, versions and the JSON results file.
"""
