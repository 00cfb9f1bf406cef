"""The console of a run: what a person reads while it runs and after it ended.

- Workers' own output (vLLM's engine logs, Ray Train's and transformers' prints, the engine's
  teardown) stays in Ray's session logs (`ray.worker_logs: false`, the default; see
  engine.init_ray): the console gets our stage lines, progress and errors.
- Progress: in a terminal, Ray Data's own progress bars; when stdout is not a terminal (CI, `ray
  job logs`, a file), one quiet line per stage every `interval` seconds instead of Ray Data's
  multi-line progress dumps (`StageProgress`).
- Known noise that Ray itself prints on a successful run is dropped from the console by
  `filtered_console()` (the session logs keep it); each pattern says why it is safe to drop.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from typing import Callable, Optional

# (pattern, why it is noise). Matched against whole console lines.
KNOWN_NOISE = [
    (re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
                r"and max_restarts > 0"),
     "Ray logs this at ERROR level for every Ray Data actor pool, because Ray Data passes an actor "
     "handle to its pools' constructors (ray-project/ray#57733); nothing fails."),
    (re.compile(r"Found multiple active Ray instances"),
     "Ray Train's placement-group cleaner looks for 'the' Ray of the machine when more than one runs "
     "(e.g. tests side by side); the run's own Ray is unaffected."),
]


def is_noise(line: str) -> bool:
    return any(p.search(line) for p, _ in KNOWN_NOISE)


@contextlib.contextmanager
def filtered_console():
    """Pipe this process's stdout and stderr (file descriptors 1 and 2, so Ray's C++ logs too)
    through a filter that drops KNOWN_NOISE lines. Partial lines (progress bars redrawn with \\r)
    pass through as they come. SCALEQUEST_RAY_RAW_CONSOLE=1 turns the filter off."""
    if os.environ.get("SCALEQUEST_RAY_RAW_CONSOLE"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    threads = []
    for fd in (1, 2):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        t = threading.Thread(target=_pump, args=(r, saved[fd]), daemon=True)
        t.start()
        threads.append((t, r))
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)  # closes the pipes' write ends: the pumps see EOF
        for t, _ in threads:
            t.join(timeout=5)
        for fd in saved.values():
            os.close(fd)


def _pump(read_fd: int, out_fd: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not is_noise(line.decode("utf-8", "replace")))
        if b"\r" in pending:  # a progress bar being redrawn: show it now
            out, pending = out + pending, b""
        if out:
            os.write(out_fd, out)
    if pending and not is_noise(pending.decode("utf-8", "replace")):
        os.write(out_fd, pending)
    os.close(read_fd)


def interactive() -> bool:
    return sys.stdout.isatty()


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StageProgress:
    """Every `interval` seconds while a stage runs, one line: rows done (of the expected), rows/s,
    tokens/s, ETA. `done()` returns (rows, tokens) written so far: the runner reads them from
    the stage's written files (their footers), so the line costs a listing, never a data read."""

    def __init__(self, stage: str, done: Callable[[], tuple[int, int]], expected: Optional[int],
                 echo=print, interval: float = 30.0):
        self.stage, self.done, self.expected, self.echo, self.interval = stage, done, expected, echo, interval
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def line(self) -> str:
        rows, tokens = self.done()
        elapsed = max(time.time() - self.started, 1e-9)
        rate = rows / elapsed
        text = f"[{self.stage}] {rows:,}" + (f"/{self.expected:,}" if self.expected else "") + f" rows, {rate:,.1f} rows/s"
        if tokens:
            text += f", {tokens / elapsed:,.1f} tok/s"
        if self.expected and rate > 0 and rows < self.expected:
            text += f", ETA {_eta((self.expected - rows) / rate)}"
        return text + f" ({_eta(elapsed)} in)"

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.echo(self.line())
            except Exception:  # noqa: BLE001 - a progress line never fails a stage
                pass
