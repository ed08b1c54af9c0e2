"""Progress lines of long loops, seen in a notebook and in a headless run's terminal.

A stage's notebook runs in a papermill kernel whose output lands in the executed
notebook, not in the terminal of ``python -m screener_nb run``. :func:`report` prints
its line (so the notebook keeps it) and, when the runner has named a progress file in
``SCREENER_PROGRESS_FILE``, appends the line there too; the runner relays that file's
new lines to its terminal while the notebook executes (:class:`Relay`).

:class:`Throttle` spaces the lines of a training loop (one every ``every_s`` seconds,
and always the last), :func:`eta_text` formats elapsed and remaining time.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

PROGRESS_ENV = "SCREENER_PROGRESS_FILE"


def report(line: str) -> None:
    """Print ``line``; also append it to the runner's progress file when one is set."""
    print(line, flush=True)
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # one short write per line: the relay never sees half a line
            f.write(line.replace("\n", " ") + "\n")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def eta_text(done: int, total: int, elapsed_s: float) -> str:
    """``"elapsed 1:05, left ~2:10"``: the time left assumes the rate so far (``done`` of ``total``)."""
    if done <= 0 or total <= done:
        return f"elapsed {_clock(elapsed_s)}"
    return f"elapsed {_clock(elapsed_s)}, left ~{_clock(elapsed_s / done * (total - done))}"


class Throttle:
    """``ready(now)`` is true at most once every ``every_s`` seconds (and on ``final=True``)."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.perf_counter):
        self.every_s, self.clock = float(every_s), clock
        self.last = self.clock()

    def ready(self, final: bool = False) -> bool:
        now = self.clock()
        if final or now - self.last >= self.every_s:
            self.last = now
            return True
        return False


class Relay:
    """Copy the lines appended to ``path`` to ``emit`` from a background thread, until closed.

    Used as a context manager around a notebook's execution; on exit the lines written
    last are relayed too, so no line is lost.
    """

    def __init__(self, path: str | Path, emit: Callable[[str], None] = print, poll_s: float = 0.5):
        self.path, self.emit, self.poll_s = Path(path), emit, float(poll_s)
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Relay":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for its newline
        self._offset += end
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            self.emit(line)
