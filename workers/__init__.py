"""Celery workers: ``celery -A workers worker`` and ``celery -A workers flower`` find ``app`` here."""

from workers.app import create_app

app = create_app()

__all__ = ["app", "create_app"]
