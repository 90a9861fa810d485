"""The pipeline's Airflow assets, each URI defined once (imported by the DAG files)."""

from airflow.sdk import Asset

RAW = Asset(name="valueloop_raw", uri="valueloop://warehouse/raw", group="warehouse")
MARTS = Asset(name="valueloop_marts", uri="valueloop://warehouse/marts", group="warehouse")
CHAMPION = Asset(
    name="valueloop_champion", uri="valueloop://registry/valueloop-customer-model", group="registry"
)
SCORES = Asset(
    name="valueloop_scores", uri="valueloop://warehouse/marts/customer_scores", group="warehouse"
)
FEEDBACK = Asset(
    name="valueloop_feedback", uri="valueloop://warehouse/raw/feedback", group="warehouse"
)
# Emitted when a retraining trigger fires; its extra says which model and why.
RETRAIN = Asset(name="valueloop_retrain_request", uri="valueloop://loop/retrain", group="loop")
