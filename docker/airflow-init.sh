#!/usr/bin/env bash
# airflow-init: migrations, the admin login, the warehouse pool and the dbt manifest, once per
# `docker compose up`. Idempotent: every step can run again on an existing volume.
set -euo pipefail

airflow db migrate

# Simple auth manager: the admin's password comes from .env, never from the image.
passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
mkdir -p "$(dirname "$passwords")"
python -c 'import json, os, sys; json.dump({os.environ["AIRFLOW_ADMIN_USER"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, open(sys.argv[1], "w"))' "$passwords"
chmod 600 "$passwords"

airflow pools set valueloop_warehouse 1 \
  "DuckDB allows one writer: every task that writes the warehouse takes this slot"

# cosmos renders the dbt task group from the manifest in $VALUELOOP_HOME/dbt/target.
python -c 'from valueloop import transform; from valueloop.config import load_settings; transform.run_dbt(load_settings(), ["parse"], quiet=True)'

# The GX project lives on the data volume (VALUELOOP_GX_PROJECT_DIR): the image's copy goes
# there, over the suites of an older image; results and Data Docs (gx/uncommitted) stay.
mkdir -p "${VALUELOOP_GX_PROJECT_DIR}"
cp -R /opt/valueloop/expectations/. "${VALUELOOP_GX_PROJECT_DIR}/"

# It runs as root to prepare the volumes; every other service runs as AIRFLOW_UID.
chown -R "${AIRFLOW_UID:-50000}:0" /data /opt/airflow/logs /opt/airflow/auth /mlartifacts
