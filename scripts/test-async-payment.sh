#!/usr/bin/env bash
# Performance test of the asynchronous pipeline: runs the end-to-end demo with PAYMENTS payments
# (default 50) and prints its figures; the last line is JSON. Exits non-zero unless all complete.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s setup
exec .venv/bin/python -m payments.demo --payments "${PAYMENTS:-50}"
