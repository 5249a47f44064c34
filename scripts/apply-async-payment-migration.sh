#!/usr/bin/env bash
# Applies the database migrations (including 006_update_payment_queue_status) to $DATABASE_URL.
# Idempotent: already-applied revisions are skipped. Take a backup first in production:
#   pg_dump "$DATABASE_URL" > backup.sql
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to the PostgreSQL to migrate}"
make -s setup
exec .venv/bin/python -m payments.migrate --database-url "$DATABASE_URL"
