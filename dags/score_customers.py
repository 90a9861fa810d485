"""
### score_customers

Runs when the marts are rebuilt or a new champion is promoted. Scores every customer with
`models:/valueloop-customer-model@champion`:

0. **champion_ready**: with no champion yet (a first deployment, where the marts arrive
   before training has promoted one) the run is skipped, not failed; the champion asset
   triggers scoring once there is one;
1. **score**: predictions, segments and next best actions into the candidate tables (schema
   `scoring`), leaving the published tables untouched;
2. **check_scores**: the Great Expectations `scores` checkpoint on the candidate;
3. **publish**: in one transaction, `marts.customer_scores`, `marts.segment_summary` and the
   run in `marts.customer_scores_history`; then the BI views, the Parquet export and the HTML
   report and the monitoring tables (drift, tier migration, measured performance); updates
   the scores asset;
4. **plan_campaign**: the next campaign from the published scores, with randomised control
   groups (`marts.campaign_assignments`, files in `exports/campaigns/`); a campaign planned
   before (re-scoring the same data) is kept as it was exported.

The scoring run id is the Airflow run id: re-running a run replaces its history rows.
"""

from datetime import UTC, datetime

from airflow.sdk import dag, task

from valueloop.assets import CHAMPION, MARTS, SCORES
from valueloop.orchestration import DEFAULT_ARGS, WAREHOUSE_POOL


@dag(
    dag_id="score_customers",
    schedule=(MARTS | CHAMPION),
    start_date=datetime(2025, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["valueloop", "ml", "bi"],
    doc_md=__doc__,
)
def score_customers():
    @task.short_circuit
    def champion_ready() -> bool:
        """Skip, rather than fail, while no model is champion yet (a first deployment)."""
        from ml.score import has_champion
        from valueloop.config import load_settings

        return has_champion(load_settings())

    @task(pool=WAREHOUSE_POOL)
    def score(run_id=None) -> dict:
        from ml.score import score_candidates
        from valueloop.config import load_settings

        return score_candidates(load_settings(), run_id)

    @task(pool=WAREHOUSE_POOL)
    def check_scores(stats: dict) -> str:
        from ml.score import check_candidates
        from valueloop.config import load_settings

        return check_candidates(load_settings(), stats["run_id"]).summary()

    @task(pool=WAREHOUSE_POOL, outlets=[SCORES])
    def publish(stats: dict) -> str:
        from ml.score import publish as publish_scores
        from valueloop.config import load_settings

        return publish_scores(load_settings(), stats["run_id"]).summary()

    @task(pool=WAREHOUSE_POOL)
    def plan_campaign() -> str:
        from valueloop.campaigns import CampaignSent, plan
        from valueloop.config import load_settings

        try:
            return plan(load_settings()).summary()
        except CampaignSent as sent:  # its outcomes came back: the campaign stays as sent
            return str(sent)

    stats = score()
    champion_ready() >> stats
    check_scores(stats) >> publish(stats) >> plan_campaign()


score_customers()
