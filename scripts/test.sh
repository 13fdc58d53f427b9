#!/usr/bin/env bash
# The test suite (what .ci/run calls): makes sure .venv is installed, then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the long kernel sweeps.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --no-run
set +e
.venv/bin/python -m pytest --durations=40 "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "test.sh: pytest collected no tests — that is a failure, not a pass" >&2
  exit 1
fi
exit "$status"
