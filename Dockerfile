# One image for every service of docker-compose.yml: the Airflow components, the Celery
# workers, the MLflow server and the trainer. It holds the project and its lock, nothing else.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    VALUELOOP_HOME=/data \
    HF_HUB_OFFLINE=1

# curl for the healthchecks, libgomp1 for LightGBM, tini to reap the workers' children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*

# Airflow's convention: uid 50000, gid 0, so volumes written by any service stay readable.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home valueloop \
    && mkdir -p /data /opt/valueloop /mlartifacts \
    && chown -R 50000:0 /data /opt/valueloop /mlartifacts

WORKDIR /opt/valueloop

# The lock first, so that code changes do not reinstall the dependencies. On a machine with
# a GPU, torch==2.13.0 from PyPI brings its CUDA libraries (the trainer uses them).
COPY --chown=50000:0 requirements.txt requirements-stack.txt ./
RUN pip install -r requirements.txt -r requirements-stack.txt \
    && pip check

COPY --chown=50000:0 . .
RUN pip install --no-deps -e .

USER 50000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["valueloop", "--help"]
