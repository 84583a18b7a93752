"""`eligen train`'s options: a validated dataclass whose every field is a flag and a YAML key (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..choices import TIMESTEP_SAMPLING
from ..config import option
from ..families import titles
from ..files import read_utf8


@dataclass
class TrainConfig:
    """Everything `eligen train` reads; a YAML file sets any field and every field is also a flag."""

    config: Path | None = option(None, "YAML file with any of these fields (flags override it)", positional=True)
    model: str | None = option("eligen-tiny", f"diffusers {titles()} pipeline directory or hub id to train "
                               "on (default: the shipped tiny model)")
    dataset: Path | None = option(None, "training data: our JSONL or the reference metadata.json (records with "
                                  "input_image for an edit model)")
    output_dir: Path | None = option(None, "where checkpoints, logs, validation grids and the LoRA go")
    resolution: int | None = option(None, "training side length (aspect-ratio buckets keep about this many pixels; "
                                    "default: the model's native size)")
    buckets: bool = option(True, "aspect-ratio buckets (else square crops)")
    rank: int | None = option(None, "LoRA rank (default: the family's recipe, e.g. 64 as in the paper or "
                              "32 as in the reference)")
    alpha: float | None = option(None, "LoRA alpha (default: the rank)")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps")
    max_steps: int = option(1000, "optimisation steps")
    batch_size: int = option(1, "samples per device per micro-batch")
    gradient_accumulation: int = option(1, "micro-batches per optimisation step (paper: batch 64 in all)")
    timestep_sampling: str = option("reference", "noise levels: reference (uniform over the shift-3 schedule, "
                                    "Gaussian-weighted) or logit_normal", choices=TIMESTEP_SAMPLING)
    guidance: float = option(1.0, "embedded guidance value during training (reference: 1.0)")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: bf16 on CUDA, no on CPU)",
                                         choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False, "recompute block activations in the backward pass")
    cache_text_embeddings: bool = option(True, "encode every prompt once and reuse it (T5 is large)")
    max_sequence_length: int | None = option(None, "text tokens per prompt segment (default: the model's, as "
                                             "`eligen generate` uses it)")
    drop_entities: float = option(0.1, "share of samples trained with the global prompt only (keeps it working)")
    max_entities: int | None = option(None, "use at most this many entities per image")
    max_bad_fraction: float = option(0.1, "fail if more than this share of the records is bad")
    checkpoint_every: int = option(500, "write a checkpoint every K steps")
    keep_checkpoints: int = option(3, "keep the last N checkpoints")
    resume: bool = option(False, "continue from the latest checkpoint in output_dir")
    overwrite: bool = option(False, "start afresh in an output_dir that holds another run's checkpoints (deletes them)")
    validate_every: int = option(0, "render the validation layouts every K steps (0: only at the end)")
    validation_layouts: list[str] = option([], "layout JSON files rendered into the validation grid", repeat=True,
                                           metavar="LAYOUT")
    validation_steps: int = option(20, "denoising steps of the validation renders")
    validation_guidance: float = option(3.5, "embedded guidance of the validation renders (guidance-distilled "
                                        "models; training itself uses --guidance)")
    log_every: int = option(10, "TensorBoard logging interval in steps")
    seed: int = option(0, "seed of the data order, noise and noise levels")
    num_workers: int = option(0, "data loader worker processes")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        for name in ("config", "dataset", "output_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        positive = ("resolution", "max_steps", "batch_size", "gradient_accumulation", "checkpoint_every",
                    "keep_checkpoints", "log_every", "max_sequence_length", "validation_steps")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.validate_every < 0:
            raise ValueError("learning_rate must be > 0, warmup_steps and validate_every >= 0")
        if not 0 <= self.drop_entities <= 1 or not 0 <= self.max_bad_fraction <= 1:
            raise ValueError("drop_entities and max_bad_fraction are shares in [0, 1]")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}")

    def require(self) -> None:
        missing = [n for n in ("model", "dataset", "output_dir") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}: set them in the YAML file or with --" +
                             " --".join(m.replace("_", "-") for m in missing))


# Options a resumed run may change: they steer the run, not what it learns. Any other change is refused by name.
RESUMABLE_CHANGES = frozenset({"config", "output_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                               "validate_every", "validation_layouts", "validation_steps", "num_workers", "progress",
                               "resume", "overwrite", "gradient_checkpointing", "cache_text_embeddings",
                               "validation_guidance"})


def changed_options(stored: dict[str, Any], config: TrainConfig, same_data: bool = False) -> list[str]:
    """The options of ``config`` that differ from a checkpoint's ``stored`` ones and that a resume cannot apply.
    The output folder is the checkpoint's own (it may have moved); ``same_data``: the dataset file holds what the
    run started with (compared by content, so a moved folder or another working directory is no change)."""
    current = jsonable_config(config)
    exempt = RESUMABLE_CHANGES | ({"dataset"} if same_data else set())
    return sorted(k for k in current if k not in exempt and k in stored and stored[k] != current[k])


def jsonable_config(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def load_train_config(given: dict[str, Any]) -> TrainConfig:
    """Defaults < the YAML file named by ``config`` < the flags given."""
    from ..config import config_from_mapping

    try:
        import yaml
    except ImportError as exc:
        raise ValueError("reading a training YAML file needs PyYAML: pip install 'eligen[train]'") from exc

    stored: dict[str, Any] = {}
    if given.get("config") is not None:
        path = Path(given["config"])
        try:
            stored = yaml.safe_load(read_utf8(path, "training config")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read the training config {path}: {exc}") from exc
        if not isinstance(stored, dict):
            raise ValueError(f"{path} must hold a mapping of TrainConfig fields")
        base = path.parent  # relative paths in the YAML file are relative to it
        for key in ("dataset", "output_dir"):
            if isinstance(stored.get(key), str) and not Path(stored[key]).is_absolute():
                stored[key] = str(base / stored[key])
        if isinstance(stored.get("model"), str) and (base / stored["model"]).exists():
            stored["model"] = str(base / stored["model"])
        layouts = stored.get("validation_layouts")
        if isinstance(layouts, list):  # anything else is named by the type check below
            stored["validation_layouts"] = [str(base / p) if isinstance(p, str) and not Path(p).is_absolute() else p
                                            for p in layouts]
    return config_from_mapping(TrainConfig, stored, given)
