"""The Ray Data engine: a batch command's pending items as a Ray dataset, mapped by a pool of actors.

Each actor builds its worker once (the command's ``factory``: it loads the pipeline or the VLM client) and then
calls it on groups of items; the worker is the command's own per-item function, the one its local loop calls, so
the files written are the same and are written the same way (atomically, keyed by the item). The actor returns a
status row per item (its key, whether it succeeded, why not, the attempts, and a pickled result for commands that
collect one); the driver streams those rows, shows progress and names every failure. Retries are bounded: an item
that raises is tried ``1 + retries`` times inside its actor, and an actor that dies is restarted and its batch
resubmitted up to ``retries`` times (Ray's ``max_restarts`` / ``max_task_retries``). Ray is imported only here and
only when the engine runs (docs/design.md "Scale: Ray Data").
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .options import RAY_EXTRA, EngineOptions

Worker = Callable[[list[dict[str, Any]]], list[Any]]  # items -> one result per item (None when it only writes)
# Test hooks, read by the driver and handed to the actors: make the items named fail (always raise), or kill their
# actor once (the first time such an item starts; a marker file in the folder named first remembers it).
FAIL_HOOK = "ELIGEN_TEST_RAY_FAIL"
EXIT_ONCE_HOOK = "ELIGEN_TEST_RAY_EXIT_ONCE"


@dataclass
class EngineResult:
    """What a run did: the keys that succeeded, ``(key, reason)`` of those that failed, each success's result."""

    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


def require_ray():
    """The ``ray`` module, or a ValueError naming the extra to install."""
    try:
        import ray
        import ray.data  # the engine's half of ray
    except ImportError:
        raise ValueError(f"--engine ray needs Ray Data: {RAY_EXTRA}") from None
    return ray


def default_num_gpus(device: str | None) -> float:
    """GPUs per actor when ``--num-gpus`` is not given: 1 when the run's device is (or would default to) CUDA."""
    if device is not None:
        return 1.0 if device.startswith("cuda") else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def test_hooks() -> dict[str, str]:
    """The test hooks set in the driver's environment (handed to the actors, which may run elsewhere)."""
    return {name: os.environ[name] for name in (FAIL_HOOK, EXIT_ONCE_HOOK) if os.environ.get(name)}


def _apply_hooks(hooks: dict[str, str], keys: list[str]) -> None:
    """Each hook is ``FOLDER:KEY,KEY,...``: FAIL appends a line to ``FOLDER/attempts-KEY`` and raises on every
    attempt; EXIT_ONCE kills the actor the first time (``FOLDER/exited-KEY`` remembers it)."""
    folder, _, names = hooks.get(FAIL_HOOK, "").partition(":")
    for key in sorted(set(filter(None, names.split(","))) & set(keys)):
        with open(Path(folder) / f"attempts-{key}", "a") as log:
            log.write("attempt\n")
        raise RuntimeError(f"test hook: item {key} always fails")
    folder, _, names = hooks.get(EXIT_ONCE_HOOK, "").partition(":")
    for key in sorted(set(filter(None, names.split(","))) & set(keys)):
        marker = Path(folder) / f"exited-{key}"
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the actor dies mid-batch, as a crashed or preempted worker does


def _plain(value: Any) -> Any:
    """A dataset value as plain Python (numpy scalars back to int/str/float)."""
    return value.item() if hasattr(value, "item") else value


class ItemActor:
    """One replica: builds the worker once, then runs groups of items with bounded retries."""

    def __init__(self, factory: Callable[[], Worker], retries: int, hooks: dict[str, str]) -> None:
        self.work = factory()
        self.retries = retries
        self.hooks = hooks

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """``batch``: columns of items (one ``key`` each) -> columns ``key, ok, reason, attempts, result``."""
        names = list(batch)
        items = [{name: _plain(batch[name][i]) for name in names} for i in range(len(batch["key"]))]
        keys = [str(item["key"]) for item in items]
        reason = ""
        for attempt in range(1, self.retries + 2):
            try:
                _apply_hooks(self.hooks, keys)
                results = self.work(items)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            return {"key": keys, "ok": [True] * len(keys), "reason": [""] * len(keys),
                    "attempts": [attempt] * len(keys), "result": [pickle.dumps(result) for result in results]}
        return {"key": keys, "ok": [False] * len(keys), "reason": [reason] * len(keys),
                "attempts": [self.retries + 1] * len(keys), "result": [b""] * len(keys)}


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` (else RAY_ADDRESS, else a new local Ray) unless this process already has Ray; True when
    this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=True, logging_level="WARNING")
    return True


def run_items(items: list[dict[str, Any]], factory: Callable[[], Worker], options: EngineOptions, *,
              device: str | None, desc: str, progress: bool, group: int = 1) -> EngineResult:
    """Run ``factory()``'s worker over ``items`` (dicts of plain values, each with a unique ``key``) on Ray actors,
    ``group`` items per call; per-item status rows are gathered as they stream back."""
    ray = require_ray()
    from ray.data import ActorPoolStrategy, DataContext

    started = _connect(ray, options.ray_address)
    num_gpus = options.num_gpus if options.num_gpus is not None else default_num_gpus(device)
    result = EngineResult()
    try:
        DataContext.get_current().enable_progress_bars = False  # ours below counts items, not blocks
        with warnings.catch_warnings():  # Ray 2.60 marks the actor options (max_restarts, ...) deprecated, for 2.64
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = ray.data.from_items(items).map_batches(
                ItemActor, batch_size=group, compute=ActorPoolStrategy(size=options.actors), num_gpus=num_gpus,
                fn_constructor_args=(factory, options.retries, test_hooks()), max_restarts=options.retries,
                max_task_retries=options.retries)
        with tqdm(total=len(items), desc=f"{desc} (ray)", unit="img", disable=not progress) as bar:
            for row in _rows(ray, dataset):
                if row["ok"]:
                    result.done.append(row["key"])
                    result.results[row["key"]] = pickle.loads(row["result"])
                else:
                    result.failed.append((row["key"], row["reason"]))
                bar.update(1)
                bar.set_postfix(failed=len(result.failed))
    finally:
        if started:
            ray.shutdown()
    result.failed.sort()
    return result


def _rows(ray, dataset):
    """The dataset's status rows; a run Ray itself gave up on (an actor that died more than ``--retries`` times,
    a replica that could not load) is a ValueError that says finished items are kept."""
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the Ray run stopped ({type(exc).__name__}: {first}); every finished item is kept: rerun "
                         "the command to do the rest") from None


def report_failures(failed: list[tuple[str, str]], retries: int) -> None:
    """Name every failed item and why, on stderr."""
    for key, reason in failed:
        print(f"failed: {key}: {reason} (after {retries + 1} attempt(s))", file=sys.stderr)
