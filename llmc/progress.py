"""Rich progress bars shared by every stage (transient, on stderr, silent when disabled or -q).

They go to stderr so that a command's stdout holds only its result (`--json` output stays one
JSON document).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def stage_progress(enabled: bool, total: int, label: str, unit: str = "") -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1)`; shows a bar with count, rate and elapsed time when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn)

    columns = ["[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TimeElapsedColumn()]
    if unit:
        columns.append(TextColumn("[cyan]{task.fields[rate]}"))
    from llmc.console import err_console

    with Progress(*columns, transient=True, console=err_console()) as progress:
        task = progress.add_task(label, total=total, rate="")

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            t = progress.tasks[task]
            if unit and t.speed:
                progress.update(task, rate=f"{t.speed:.1f} {unit}/s")

        yield advance
