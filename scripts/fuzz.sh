#!/usr/bin/env bash
# The hypothesis fuzzers at full size (about 2,900 cases); the suite runs a quarter of them (tests/fuzzing.py).
# Usage: bash scripts/fuzz.sh [pytest args...]   ORCH_FUZZ_SCALE=4 fuzzes four times longer still.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export ORCH_FUZZ_SCALE="${ORCH_FUZZ_SCALE:-1}"
exec bash scripts/test.sh tests/unit/test_fuzz_workflows.py tests/integration/test_fuzz_api.py \
    tests/security/test_schemas.py "$@"
