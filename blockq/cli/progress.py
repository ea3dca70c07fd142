"""Progress bars on stderr shared by the commands that work through chunks of text."""
from __future__ import annotations


class ChunkProgress:
    """Chunks done / total and the running value of a metric; call it with (done, total, value)."""

    def __init__(self, what: str, label: str):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)
        self.label = label
        self._p = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=True)
        self._task = None

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def note(self, text: str) -> None:
        """One line on stderr above the bar."""
        self._p.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __call__(self, done: int, total: int, value: float) -> None:
        if self._task is None:
            self._task = self._p.add_task("", total=total, info="")
        info = "" if value != value else f"{self.label} {value:.4f}"  # NaN: not known yet
        self._p.update(self._task, completed=done, info=info)
