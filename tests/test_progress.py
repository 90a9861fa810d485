"""What `valueloop run` draws: task events to stage lines, the quiet runner, the board."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tests.conftest import REPO_ROOT
from valueloop import progress
from valueloop.quietly import format_duration
from valueloop.terminal import StageBoard

QUIETLY = (sys.executable, "-m", "valueloop.quietly")


def test_every_task_of_the_dags_maps_to_a_named_stage() -> None:
    assert progress.stage_of("ingest_and_transform", "land") == "ingest"
    assert progress.stage_of("ingest_and_transform", "dbt.stg_shop__orders_run") == "dbt build"
    assert progress.stage_of("ingest_and_transform", "dbtx") == "dbtx"  # prefixes end in "."
    assert progress.stage_of("score_customers", "score") == "score"
    assert progress.stage_of("score_customers", "check_scores") == "scores checks"
    assert progress.stage_of("train_model", "announce_uplift_champion") == "train + gate"


def test_the_event_reader_returns_whole_lines_only_once(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    reader = progress.EventReader(path)
    assert reader.new_events() == []  # not written yet
    first = json.dumps({"task_id": "land", "event": "started"})
    second = json.dumps({"task_id": "land", "event": "success"})
    path.write_text(first + "\n" + second[:10])  # the second line is still being written
    assert [e["event"] for e in reader.new_events()] == ["started"]
    with path.open("a") as handle:
        handle.write(second[10:] + "\n")
    assert [e["event"] for e in reader.new_events()] == ["success"]
    assert reader.new_events() == []


def test_a_task_callback_appends_an_event_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    class TaskInstance:
        dag_id, task_id, try_number = "train_model", "train", 1

    context = {"ti": TaskInstance(), "run_id": "manual__x"}
    monkeypatch.delenv(progress.PROGRESS_FILE_ENV, raising=False)
    progress.record_task_event(context, "started")  # under a scheduler: nothing to follow
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(path))
    progress.record_task_event(context, "started")
    (event,) = progress.EventReader(path).new_events()
    assert (event["dag_id"], event["task_id"], event["event"]) == (
        "train_model",
        "train",
        "started",
    )


def test_the_board_prints_one_plain_line_per_stage_off_a_terminal() -> None:
    out = io.StringIO()
    with StageBoard(Console(file=out, width=100)) as board:
        with board.stage("ingest"):
            board.update("ingest", "10 rows")
        board.start("dbt build")
        board.finish("dbt build", ok=False, detail="task dbt.x failed")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("✓ ingest") and lines[0].endswith("10 rows")
    assert lines[1].startswith("✗ dbt build") and "task dbt.x failed" in lines[1]


def test_durations_read_like_a_person_writes_them() -> None:
    assert format_duration(4.25) == "4.2s"
    assert format_duration(65) == "1m05s"
    assert format_duration(600) == "10m00s"


def test_the_quiet_runner_keeps_output_in_the_log_and_shows_it_on_failure(tmp_path: Path) -> None:
    log = str(tmp_path / "step.log")

    def quietly(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*QUIETLY, "--label", "step", "--log", log, "--", sys.executable, "-c", code],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )

    ok = quietly("print('noise ' * 3)")
    assert ok.returncode == 0 and ok.stdout.startswith("✓ step") and "noise" not in ok.stdout
    assert "noise noise" in (tmp_path / "step.log").read_text()
    failed = quietly("import sys; print('the reason'); sys.exit(3)")
    assert failed.returncode == 3
    assert failed.stdout.startswith("✗ step") and "the reason" in failed.stdout
