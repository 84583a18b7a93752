"""One generation at a time per model: a first-in first-out queue served by one worker thread, so two browser
tabs never share a running pipeline. Every job reports its queue position or its step while it runs; a queued job
can be cancelled at once and a running one at its next step; the queue holds a bounded number of waiting jobs, and
the finished ones are kept (newest last) as the app's history."""

from __future__ import annotations

import secrets
import threading
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KEPT_JOBS = 64  # finished jobs remembered (with their files); older ones are forgotten
FINISHED = ("done", "error", "cancelled")


class QueueFull(Exception):
    """The queue already holds its limit of waiting jobs."""


class JobCancelled(Exception):
    """Raised inside a running job (from its step callback) once it has been cancelled."""


@dataclass
class Job:
    """A unit of work: ``task(job)`` returns the result the page reads; ``step``/``steps`` show its progress."""

    task: Callable[[Job], dict[str, Any]]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"  # queued | running | done | error | cancelled
    step: int = 0
    steps: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)  # name -> server path, served by id, never by path
    cancel_requested: bool = False

    def check_cancelled(self) -> None:
        """Called between steps: stop here if the job was cancelled."""
        if self.cancel_requested:
            raise JobCancelled


class JobQueue:
    """FIFO jobs run one at a time on a daemon thread. ``on_error(exc)`` turns a failure into the page's error;
    ``max_waiting`` bounds the jobs waiting behind the running one."""

    def __init__(self, on_error: Callable[[Exception], dict[str, Any]], on_forget: Callable[[Job], None] | None = None,
                 max_waiting: int = 16):
        self._pending: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ready = threading.Condition()
        self._on_error = on_error
        self._on_forget = on_forget
        self._max_waiting = max_waiting
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="eligen-ui-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns its position (0: it runs next). Raises :class:`QueueFull` at the limit."""
        with self._ready:
            if self._closed:
                raise RuntimeError("the app is shutting down")
            waiting = sum(1 for j in self._pending if j.state == "queued")
            if waiting >= self._max_waiting:
                raise QueueFull(f"{waiting} jobs are already waiting (this app's limit, --max-queue); wait for one to "
                                "finish or cancel one")
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
                return self._pending.index(job) if job.state == "queued" else None
            except ValueError:
                return None

    def cancel(self, job: Job) -> str:
        """Cancel ``job``: a queued one leaves the queue now, a running one stops at its next step. Returns its
        state after the request (a finished job stays as it was)."""
        with self._ready:
            if job.state == "queued":
                self._pending.remove(job)
                job.state = "cancelled"
            elif job.state == "running":
                job.cancel_requested = True
            return job.state

    def finished(self) -> list[Job]:
        """The jobs that produced an image, oldest first (the app's history)."""
        with self._ready:
            return [j for j in self._jobs.values() if j.state == "done"]

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - KEPT_JOBS)]:
            del self._jobs[job.id]
            if self._on_forget is not None:
                self._on_forget(job)

    def _next(self) -> Job | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            job = self._pending[0]
            job.state = "running"
            return job

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            result, error, state = None, None, "done"
            try:
                result = job.task(job)
            except JobCancelled:
                state = "cancelled"
            except Exception as exc:  # a failed job never stops the queue; the page shows why
                error, state = self._on_error(exc), "error"
                if error.get("internal"):
                    traceback.print_exc()
            with self._ready:
                job.result, job.error, job.state = result, error, state
                self._pending.popleft()
