"""Celery workers: ``celery -A workers worker`` and ``celery -A workers flower`` find ``app`` here."""

from workers.app import create_app

try:
    app = create_app()
except ValueError as exc:
    # A configuration error (a malformed or memory:// REDIS_URL, a number that does not parse) would reach the user
    # of `celery -A workers` buried under Celery's import traceback: one line naming it, then exit.
    raise SystemExit(f"error: {exc}") from None

__all__ = ["app", "create_app"]
