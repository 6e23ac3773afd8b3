#!/usr/bin/env bash
# Run the test suite; pytest's options (paths, timeout, warnings as errors) come from pyproject.toml.
# Usage: bash scripts/test.sh [pytest args...]    PYTHON=/path/to/python overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-.venv/bin/python}" -m pytest "$@"
