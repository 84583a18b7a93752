"""The engine options every batch command shares (`data generate`, `data annotate`, the benchmarks' generation).

``local`` is the in-process loop; ``ray`` runs the same per-item work on a pool of Ray actors
(:mod:`eligen.scale.ray_engine`, docs/design.md "Scale: Ray Data").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import option

ENGINES = ("local", "ray")
RAY_EXTRA = 'pip install "eligen[ray]"'


@dataclass(kw_only=True)
class EngineOptions:
    """Where a batch command's items run: in this process, or on a pool of Ray actors (one model replica each).
    Keyword-only, so a config's own positional fields (``AnnotateConfig(folder)``) stay first."""

    engine: str = option("local", "where the items run: local (this process) or ray (a pool of Ray actors, one "
                         "model replica each; needs eligen[ray])", choices=ENGINES)
    ray_address: str | None = option(None, "Ray cluster to run on with --engine ray (default: the RAY_ADDRESS "
                                     "environment variable, else a local Ray started for the run)", metavar="ADDRESS")
    num_gpus: float | None = option(None, "GPUs per Ray actor (0: CPU actors; default: 1 when the model runs on "
                                    "CUDA, i.e. --device cuda or none given and a GPU seen here, else 0; 0 for a "
                                    "served VLM)", metavar="G")
    actors: int = option(1, "Ray actors (model replicas) with --engine ray", metavar="N")
    retries: int = option(2, "with --engine ray: extra attempts of an item that raises, and restarts of an actor "
                          "that dies", metavar="K")

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if isinstance(self.actors, bool) or not isinstance(self.actors, int) or self.actors < 1:
            raise ValueError(f"--actors must be an integer >= 1, got {self.actors!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"--retries must be an integer >= 0, got {self.retries!r}")
        if self.num_gpus is not None and not (math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            raise ValueError(f"--num-gpus must be a number >= 0 (0: CPU actors), got {self.num_gpus!r}")
