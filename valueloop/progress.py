"""Task progress events: how `valueloop run` knows which stage the Airflow DAGs are in.

Every task's callbacks (see ``orchestration.DEFAULT_ARGS``) append one JSON line to the file
named by ``VALUELOOP_PROGRESS_FILE`` when `valueloop run` set it; the launcher follows that
file and maps each task to the stage a person reads. Standard library only: DAG files import
this at parse time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

PROGRESS_FILE_ENV = "VALUELOOP_PROGRESS_FILE"

# Per DAG: (task id, or a task group's prefix ending in ".") -> the stage a person reads.
STAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "ingest_and_transform": (
        ("land", "ingest"),
        ("ingest", "ingest"),
        ("anything_new", "ingest"),
        ("check_raw", "raw checks"),
        ("dbt.", "dbt build"),
        ("check_marts", "marts checks"),
        ("decide_retraining", "retrain?"),
        ("retraining_needed", "retrain?"),
        ("request_retraining", "retrain?"),
    ),
    "train_model": (
        ("plan", "train + gate"),
        ("snapshot_training_data", "train + gate"),
        ("train", "train + gate"),
        ("train_uplift", "train + gate"),
        ("customer_promoted", "train + gate"),
        ("announce_customer_champion", "train + gate"),
        ("uplift_promoted", "train + gate"),
        ("announce_uplift_champion", "train + gate"),
    ),
    "score_customers": (
        ("champion_ready", "score"),
        ("score", "score"),
        ("check_scores", "scores checks"),
        ("publish", "publish"),
        ("plan_campaign", "plan campaign"),
    ),
}


def stage_of(dag_id: str, task_id: str) -> str:
    for key, stage in STAGES.get(dag_id, ()):
        if task_id == key or (key.endswith(".") and task_id.startswith(key)):
            return stage
    return task_id


def is_task_group(dag_id: str, task_id: str) -> bool:
    """Whether the task belongs to a group (dbt's models), whose progress is a task count."""
    return any(key.endswith(".") and task_id.startswith(key) for key, _ in STAGES.get(dag_id, ()))


def record_task_event(context, event: str) -> None:
    """Append one task event for `valueloop run` to follow (a no-op under a scheduler)."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    ti = context["ti"]
    line = json.dumps(
        {
            "dag_id": ti.dag_id,
            "task_id": ti.task_id,
            "run_id": context.get("run_id"),
            "event": event,
            "try": ti.try_number,
            "at": time.time(),
        }
    )
    with open(path, "a") as handle:  # one short write per line: appends stay whole
        handle.write(line + "\n")


@dataclass
class EventReader:
    """Reads the task events appended since the last call (a partial last line waits)."""

    path: Path
    offset: int = 0
    pending: str = ""

    def new_events(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as handle:
            handle.seek(self.offset)
            chunk = handle.read()
            self.offset = handle.tell()
        lines = (self.pending + chunk).split("\n")
        self.pending = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]
