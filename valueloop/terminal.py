"""The terminal side of `valueloop run`: one line per stage, with a spinner and its time.

Tool output (pip, Airflow, dbt, Lightning) goes to log files; these lines are what a person
reads. On a terminal the spinners are live; in a pipe or CI log each stage prints one plain
line when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.spinner import Spinner
from rich.text import Text

from valueloop.quietly import format_duration


class _StatusColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__()
        self.spinner = Spinner("dots", style="cyan")

    def render(self, task: Task) -> Text:
        status = task.fields.get("status", "running")
        if status == "done":
            return Text("✓", style="green")
        if status == "failed":
            return Text("✗", style="bold red")
        return self.spinner.render(task.get_time())


class _DurationColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        return Text(format_duration(elapsed or 0.0).rjust(7), style="bold")


@dataclass
class StageBoard:
    """One line per stage. Live spinners on a terminal; plain lines as stages end elsewhere."""

    console: Console
    live: bool = field(init=False)
    _progress: Progress | None = field(init=False, default=None)
    _tasks: dict[str, TaskID] = field(init=False, default_factory=dict)
    _started: dict[str, float] = field(init=False, default_factory=dict)
    _details: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.live = self.console.is_terminal
        if self.live:
            self._progress = Progress(
                _StatusColumn(),
                TextColumn("{task.description:<14}"),
                _DurationColumn(),
                TextColumn("[dim]{task.fields[detail]}"),
                console=self.console,
                refresh_per_second=8,
            )

    def __enter__(self) -> StageBoard:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            self._progress.stop()

    def start(self, stage: str, detail: str = "") -> None:
        self._started[stage] = time.monotonic()
        self._details[stage] = detail
        if self._progress:
            self._tasks[stage] = self._progress.add_task(stage, total=1, detail=detail)

    def update(self, stage: str, detail: str) -> None:
        self._details[stage] = detail
        if self._progress and stage in self._tasks:
            self._progress.update(self._tasks[stage], detail=detail)

    def finish(self, stage: str, detail: str | None = None, ok: bool = True) -> None:
        detail = self._details.get(stage, "") if detail is None else detail
        status = "done" if ok else "failed"
        if self._progress:
            self._progress.update(self._tasks[stage], completed=1, detail=detail, status=status)
            return
        elapsed = format_duration(time.monotonic() - self._started.pop(stage))
        mark = "✓" if ok else "✗"
        self.console.print(f"{mark} {stage:<14} {elapsed:>7}  {detail}".rstrip(), highlight=False)

    @contextmanager
    def stage(self, stage: str, detail: str = "") -> Iterator[StageBoard]:
        """A stage run in this process: ✓ when the block ends, ✗ when it raises."""
        self.start(stage, detail)
        try:
            yield self
        except BaseException:
            self.finish(stage, "failed", ok=False)
            raise
        self.finish(stage)


@contextmanager
def tool_output_to(log_path: Path, enabled: bool = True) -> Iterator[None]:
    """Send what this process and its children write to stdout and stderr into a log file.

    Works on the file descriptors, so subprocesses, C extensions, warnings and progress bars
    land in the log too; the stage lines go to a console opened on a copy of the terminal.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
