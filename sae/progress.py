"""The progress every long stage shows: done/total, rate and ETA, and a short status (loss, L0).

On a terminal it is a rich progress bar. Anywhere else (CI, nohup, a cluster job's log file) a bar
would appear only at the end, cut to 80 columns; there a plain line per task is printed every
SAE_PROGRESS_INTERVAL seconds (30 by default) and once at the end, never cut. Nothing else is printed.
"""

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # messages are never cut or broken at 80 columns
SPEED_PERIOD_S = 300  # rate over the last 5 minutes: a training updates its bar only every log_every steps
_shared: "Progress | None" = None
"""The display that stages running at once (a harvest thread and its trainer) share: rich draws one at a time."""


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class PlainProgress(Progress):
    """rich's task bookkeeping (rates, ETA) without its live display: a timer thread prints lines."""

    def __init__(self, unit: str, interval: float):
        super().__init__(console=console, disable=True, speed_estimate_period=SPEED_PERIOD_S)
        self.unit, self.interval, self.quiet = unit, interval, False
        self._started_at: dict = {}
        self._said_finished: set = set()  # a finished task's line is said once, not with its neighbours' each time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report_every_interval, daemon=True, name="sae-progress")

    def __enter__(self) -> "PlainProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.report()

    def _report_every_interval(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        if self.quiet:
            return
        for task in self.tasks:
            if task.id in self._said_finished:
                continue
            if task.finished:
                self._said_finished.add(task.id)
            speed = task.finished_speed or task.speed or self._average_speed(task)
            done = f"{task.completed:,.0f}/{task.total:,.0f} {self.unit} ({task.percentage:.0f}%)"
            rate = f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s"
            eta = f"ETA {_clock((task.total - task.completed) / speed)}" if speed else "ETA -"
            status = f" | {task.fields['status']}" if task.fields.get("status") else ""
            print(f"{task.description}: {done}, {rate}, elapsed {_clock(task.finished_time or task.elapsed)}, {eta}{status}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        self._started_at[task_id] = self._tasks[task_id].completed  # a resumed stage starts part-way
        return task_id

    def _average_speed(self, task: Task) -> float | None:
        """Units per second since the task began: where updates come seldom (a training's log steps),
        rich's windowed estimate has too few samples."""
        done = task.completed - self._started_at.get(task.id, 0)
        return done / task.elapsed if task.elapsed and done > 0 else None


def _clock(seconds: float | None) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_progress(unit: str, quiet: bool = False) -> "Progress | contextlib.nullcontext[Progress]":
    """A progress display for tasks that take a `status` field (a short text: loss, L0); `quiet`
    shows nothing (e.g. ranks other than 0). Within shared_progress(), its display."""
    if _shared is not None and not quiet:
        return contextlib.nullcontext(_shared)
    if not console.is_terminal:
        progress = PlainProgress(unit, float(os.environ.get("SAE_PROGRESS_INTERVAL", "30")))
        progress.quiet = quiet
        return progress
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=quiet,
        speed_estimate_period=SPEED_PERIOD_S,
    )


@contextlib.contextmanager
def shared_progress(unit: str) -> Iterator[Progress]:
    """One display for every stage started within (each adds its bar), for stages that run at once."""
    global _shared
    with make_progress(unit) as progress:
        _shared = progress
        try:
            yield progress
        finally:
            _shared = None
