FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs (pyproject's packages; tests/unit/test_compose.py builds a wheel from
# exactly these): copying the whole context would also bring a host .venv and .git into the image.
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY examples ./examples
RUN pip install . \
    && useradd --create-home --uid 10001 orchestrator

# Workers execute workflow code, which has no business running as root (Celery warns about root too).
USER orchestrator

CMD ["orchestrator", "worker"]
