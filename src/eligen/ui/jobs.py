"""One generation at a time per model: a first-in first-out queue served by one worker thread, so two browser
tabs never share a running pipeline; every job reports its queue position or its step while it runs."""

from __future__ import annotations

import secrets
import threading
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KEPT_JOBS = 64  # finished jobs remembered (with their files); older ones are forgotten


@dataclass
class Job:
    """A unit of work: ``task(job)`` returns the result the page reads; ``step``/``steps`` show its progress."""

    task: Callable[[Job], dict[str, Any]]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"  # queued | running | done | error
    step: int = 0
    steps: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)  # name -> server path, served by id, never by path


class JobQueue:
    """FIFO jobs run one at a time on a daemon thread. ``on_error(exc)`` turns a failure into the page's error."""

    def __init__(self, on_error: Callable[[Exception], dict[str, Any]], on_forget: Callable[[Job], None] | None = None):
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ready = threading.Condition()
        self._on_error = on_error
        self._on_forget = on_forget
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="eligen-ui-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its position (0: it runs next)."""
        with self._ready:
            if self._closed:
                raise RuntimeError("the app is shutting down")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._ready.notify()
            return len(self._pending) - 1

    def get(self, job_id: str) -> Job | None:
        with self._ready:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of ``job`` in the queue (None once it has started)."""
        with self._ready:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "error")]
        for job in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self._jobs[job.id]
            if self._on_forget is not None:
                self._on_forget(job)

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                job = self._pending[0]
                job.state = "running"
            try:
                result = job.task(job)
            except Exception as exc:  # a failed job never stops the queue; the page shows why
                error = self._on_error(exc)
                if error.get("internal"):
                    traceback.print_exc()
                with self._ready:
                    job.error, job.state = error, "error"
                    self._pending.popleft()
                continue
            with self._ready:
                job.result, job.state = result, "done"
                self._pending.popleft()
