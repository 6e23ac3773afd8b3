"""What benchmark workers import (``ORCH_IMPORTS=scripts.steps.NAME``): step functions and raw Celery tasks.

The benchmark's own process imports the same module, so the client validates the functions its workflows name.
"""
