#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (unit tests on tiny random models and
# end-to-end tests on the real SmolLM2-135M). GPU-only tests skip with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
python -m pytest -q "$@"
