#!/usr/bin/env bash
# Lint, format check and strict typing; runs all three and fails if any failed, so one run shows every problem.
# Usage: bash scripts/check_types.sh    PYTHON=/path/to/python overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
status=0
for check in "ruff check ." "ruff format --check ." "mypy --strict orchestrator workers"; do
    echo "+ $check"
    # shellcheck disable=SC2086  # the check strings are word-split on purpose
    "$python" -m $check || status=1
done
exit "$status"
