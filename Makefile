# The README's two commands are `make run` and `make test`; both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
export VALUELOOP_HOME ?= $(CURDIR)/data
# Tool output goes here (valueloop's Settings.logs_dir); VERBOSE=1 shows it instead.
LOGS := $(VALUELOOP_HOME)/logs
VERBOSE ?=
QUIETLY = $(PYTHON) -m valueloop.quietly $(if $(VERBOSE),--verbose)

.PHONY: install run run-distributed stack-up test lint format lock clean mlflow-ui airflow

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)

# Reinstall only when the lock or the package metadata changed. One line on screen; pip's
# output goes to $(LOGS)/install.log (shown on failure).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | $(BIN)/python
	@$(QUIETLY) --label install --log $(LOGS)/install.log -- sh -c '\
	  $(BIN)/pip install --disable-pip-version-check -r requirements.txt -r requirements-dev.txt && \
	  $(BIN)/pip install --disable-pip-version-check --no-deps -e .'
	@touch $@

install: $(STAMP)

run: install ## the main job on the demo shop (VERBOSE=1 shows every tool's output)
	@$(BIN)/valueloop run $(if $(VERBOSE),--verbose)

# The browser tests drive Debian's Chromium: browsers cannot be downloaded here.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@$(QUIETLY) --label chromium --log $(LOGS)/chromium.log -- sh -c '\
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium'

# The compose test resolves docker-compose.yml with a real Compose implementation (no engine).
DOCKER_COMPOSE := /usr/bin/docker-compose
$(DOCKER_COMPOSE):
	@$(QUIETLY) --label docker-compose --log $(LOGS)/docker-compose.log -- sh -c '\
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose'

# The native production stack (valueloop/stack.py): Debian's Postgres and Redis servers, and
# the Celery provider and Postgres driver (requirements-stack.txt) in the same venv.
STACK_STAMP := $(VENV)/.stamp-stack
$(STACK_STAMP): requirements-stack.txt $(STAMP)
	@$(QUIETLY) --label stack --log $(LOGS)/stack-install.log -- sh -c '\
	  { command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql redis-server; }; } && \
	  $(BIN)/pip install --disable-pip-version-check -c requirements.txt -r requirements-stack.txt'
	@touch $@

run-distributed: $(STACK_STAMP) ## the pipeline through Postgres, Redis, 2 Celery workers and an MLflow server
	@$(BIN)/valueloop stack run

stack-up: $(STACK_STAMP) ## that stack, kept running until Ctrl-C
	@$(BIN)/valueloop stack up

test: install $(CHROMIUM) $(DOCKER_COMPOSE) $(STACK_STAMP) ## the whole test suite
	$(BIN)/pytest

airflow: install ## airflow standalone with the project's DAGs (UI on :8080)
	$(BIN)/valueloop airflow

# The tracking store the platform writes to: VALUELOOP_MLFLOW_TRACKING_URI when set.
MLFLOW_STORE = $${VALUELOOP_MLFLOW_TRACKING_URI:-sqlite:///$(VALUELOOP_HOME)/mlflow.db}

mlflow-ui: install ## the MLflow UI on the platform's tracking store
	@case "$(MLFLOW_STORE)" in http*) \
	  echo "The tracking store is an MLflow server: open $(MLFLOW_STORE)"; exit 0;; esac; \
	echo "MLflow UI: http://127.0.0.1:5000 (tracking store $(MLFLOW_STORE))"; \
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_STORE)" --host 127.0.0.1 --port 5000

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/sqlfluff lint dbt_project/models --processes 1 --disable-progress-bar

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/sqlfluff fix dbt_project/models --processes 1 --disable-progress-bar

# Regenerate the full lock from requirements.in in a scratch environment.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -r requirements.in
	{ echo "# Full lock generated from requirements.in by 'make lock'; installs offline from the registry."; \
	  .venv-lock/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.txt
	rm -rf .venv-lock

# ./data only, the default home: a VALUELOOP_HOME set elsewhere holds a team's data and stays.
clean: ## remove the environment, ./data and dbt's output
	rm -rf $(VENV) data dbt_project/target dbt_project/logs
