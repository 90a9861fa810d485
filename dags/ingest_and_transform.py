"""
### ingest_and_transform

Daily. Takes whatever waits in `$VALUELOOP_HOME/landing/<format>/` into the warehouse and
rebuilds it:

1. **land**: list the landed files (`simulator/`, `online-retail/`, `transactions/`);
2. **ingest**: load them into schema `raw` (a file already loaded is skipped; bad rows go to
   `raw.quarantine`);
   **anything_new**: a scheduled run with no new file, and no data loaded since the marts were
   last built here, skips the checks and the build: nothing would change, and the marts
   asset would rescore the same customers and re-measure the same drift every day. The
   retraining decision still runs. A run someone triggers (the UI, `valueloop run`) always
   builds: new dbt models, a withdrawn batch;
3. **check_raw**: the Great Expectations `raw` checkpoint (a critical failure stops the run;
   on success the raw asset is updated);
4. **dbt**: the dbt project rendered by astronomer-cosmos, one task per model (`dbt build`
   of the model: run, then its tests), in dependency order;
5. **check_marts**: the `marts` checkpoint; on success the build is recorded
   (`raw.marts_builds`) and the marts asset is updated, which triggers `score_customers`;
6. **decide_retraining**: the loop's triggers (no champion, new label corrections, drift,
   schedule, new campaign outcomes); when one fires, **request_retraining** updates the
   retrain asset with the reasons, which triggers `train_model`.

Every task that writes the DuckDB warehouse takes the one slot of pool `valueloop_warehouse`.
"""

from datetime import UTC, datetime

from airflow.sdk import dag, task
from cosmos import DbtTaskGroup, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos.constants import LoadMode, TestBehavior

from valueloop.assets import MARTS, RAW
from valueloop.config import load_settings
from valueloop.loop_tasks import retraining_tasks
from valueloop.orchestration import DEFAULT_ARGS, WAREHOUSE_POOL

SETTINGS = load_settings()  # environment only: no I/O at parse time
# The one setting dbt's profile needs and has no default for, as the platform resolves it: a
# container that sets only VALUELOOP_HOME still finds the warehouse under it. Everything else
# (the salt, the policy's settings) dbt reads from the worker's own environment.
DBT_ENV = {"VALUELOOP_WAREHOUSE_PATH": str(SETTINGS.warehouse_path)}


@dag(
    dag_id="ingest_and_transform",
    schedule="@daily" if SETTINGS.schedules else None,  # off: triggered runs only
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["valueloop", "ingest", "dbt", "quality"],
    doc_md=__doc__,
)
def ingest_and_transform():
    @task
    def land() -> list[dict[str, str]]:
        from valueloop import pipeline

        return pipeline.land(load_settings())

    @task(pool=WAREHOUSE_POOL)
    def ingest(items: list[dict[str, str]]) -> dict[str, object]:
        from valueloop import pipeline, transform

        settings = load_settings()
        totals = pipeline.ingest_landed(settings, items)
        return {
            **totals,
            "unbuilt": transform.marts_unbuilt(settings),  # loaded, never built (a failed run)
            "loaded_through": transform.shop_loaded_through(settings),
        }

    # Skips the build; decide_retraining still runs (a drift scoring published since the last
    # decision fires it today, not when new data next lands).
    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def anything_new(totals: dict, dag_run=None) -> bool:
        from valueloop import pipeline

        return pipeline.marts_need_building(totals, dag_run.run_type)

    @task(pool=WAREHOUSE_POOL, outlets=[RAW])
    def check_raw(run_id=None) -> str:
        from valueloop.quality.runner import run_checkpoint

        return run_checkpoint(load_settings(), "raw", run_id=run_id).summary()

    dbt = DbtTaskGroup(
        group_id="dbt",
        project_config=ProjectConfig(
            dbt_project_path=SETTINGS.dbt_project_dir,
            manifest_path=SETTINGS.dbt_target_dir / "manifest.json",
        ),
        profile_config=ProfileConfig(
            profile_name="valueloop",
            target_name="warehouse",
            profiles_yml_filepath=SETTINGS.dbt_project_dir / "profiles.yml",
        ),
        execution_config=ExecutionConfig(dbt_executable_path=SETTINGS.dbt_executable),
        render_config=RenderConfig(
            load_method=LoadMode.DBT_MANIFEST,
            exclude=["tag:scoring", "tag:bi_views"],
            # A test across models (relationships) runs after all of them, as in dbt build.
            should_detach_multiple_parents_tests=True,
            # One `dbt build` per model (the model, then its tests) halves the task count,
            # and with it the per-task start-up that dominated this group's time.
            test_behavior=TestBehavior.BUILD,
        ),
        operator_args={"pool": WAREHOUSE_POOL, "env": DBT_ENV, "append_env": True},
        default_args=DEFAULT_ARGS,
    )

    @task(pool=WAREHOUSE_POOL, outlets=[MARTS])
    def check_marts(totals: dict, run_id=None) -> str:
        from valueloop import transform
        from valueloop.quality.runner import run_checkpoint

        settings = load_settings()
        summary = run_checkpoint(settings, "marts", run_id=run_id).summary()
        transform.record_marts_build(settings, totals["loaded_through"])
        return summary

    ingested = ingest(land())
    marts_checked = check_marts(ingested)
    anything_new(ingested) >> check_raw() >> dbt >> marts_checked
    retraining_tasks(after=marts_checked, trigger_rule="none_failed")


ingest_and_transform()
