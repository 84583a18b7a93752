"""EliGen LoRA training (docs/design.md section 6): one explicit loop under accelerate, single device to many GPUs.

Per optimisation step: VAE-encode the batch, draw noise and a noise level, run the DiT with the entity prompts
and the batch's regional mask (dense, per sample: padded entities have empty masks and are exactly inert),
regress the velocity ``noise - x0``, step AdamW on the LoRA parameters only. An edit model (a card with the "edit"
feature) learns from edit records: the input image's reference tokens, made by the edit pipeline's own code, follow
the noisy image tokens as at inference, and the loss is on the image tokens only (docs/design.md section 21).
Every random draw of a batch comes from a generator seeded by (seed, epoch, global batch index), so W processes with
gradient accumulation A take the steps of one process with accumulation W x A (docs/design.md section 6.1).
Checkpoints hold the adapter, optimizer, LR schedule and the data position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from ..families.base import Branch, ReferenceTokens
from ..files import atomic_path, file_sha256
from ..masks import latent_grid_size, pixel_masks_to_covers, reference_cover
from ..options import pipeline_sampling_defaults
from ..regional.sequence import TokenSequence
from .config import TrainConfig, changed_options, jsonable_config
from .loss import batch_generator, flow_loss, noisy_latents, per_sample_loss, sample_sigmas

CHECKPOINT_PREFIX = "checkpoint-"
RANDOM_DRAWS = "per-batch"  # trainer.json's "random_draws": how the run drew its noise (older checkpoints lack it)
LOSS_BINS = 5  # TensorBoard: loss per noise-level bin (sigma in [0, 0.2), ..., [0.8, 1])


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    lora_files: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def require_training_extra() -> None:
    """Training writes TensorBoard logs, which the inference install leaves out: say how to get them."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("eligen train logs to TensorBoard, which the core install leaves out; install the training "
                         "extra: pip install 'eligen[train]'")


def pad_stack(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T_i, D)`` sequences -> ``(B, max T_i, D)`` padded with zeros after each, and ``(B, max T_i)`` bool valid."""
    length = max(s.shape[0] for s in sequences)
    padded = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[0])) for s in sequences])
    valid = torch.arange(length)[None, :] < torch.tensor([s.shape[0] for s in sequences])[:, None]
    return padded, valid


def add_lora(transformer: torch.nn.Module, rank: int, alpha: float | None, names: list[str]) -> None:
    """A trainable peft LoRA (A Gaussian, B zero: starts as the identity) on the named linear layers."""
    import re

    from peft import LoraConfig
    transformer.requires_grad_(False)
    # add_adapter is diffusers' PeftAdapterMixin's; peft annotates lora_alpha int, but the scale alpha / r takes floats
    cast(Any, transformer).add_adapter(LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank,  # type: ignore[arg-type]
        init_lora_weights="gaussian", target_modules="|".join(re.escape(n) for n in names)))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor shard (FSDP2) is gathered from the ranks, so every rank must call this."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


def lora_weights_from_model(transformer: torch.nn.Module, alpha: float):
    """The trained adapter as :class:`eligen.lora.LoraWeights` (float32 copies). Under FSDP every rank calls it."""
    from peft.utils import get_peft_model_state_dict

    from ..lora import LoraLayer

    state = get_peft_model_state_dict(transformer)
    layers = {}
    for key, tensor in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = state[f"{module}.lora_B.weight"]
            layers[module] = LoraLayer(full_tensor(tensor).detach().float().cpu().clone(),
                                       full_tensor(up).detach().float().cpu().clone(), float(alpha))
    return layers


def save_lora_files(weights, output_dir: Path, family: str | None = None) -> dict[str, Path]:
    """The LoRA in the diffusers key format and the family's own ones (its ``KeyFormats.forms``; all three when no
    family is named): ``eligen_lora{,_diffsynth,_kohya}.safetensors``."""
    from ..lora import key_formats, save_state_dict, write_lora

    forms = key_formats()[family].forms if family is not None else ("diffsynth", "kohya")
    files: dict[str, Path] = {"diffusers": output_dir / "eligen_lora.safetensors"}
    files.update({fmt: output_dir / f"eligen_lora_{fmt}.safetensors" for fmt in ("diffsynth", "kohya") if fmt in forms})
    for fmt, path in files.items():
        with atomic_path(path) as tmp:
            save_state_dict(write_lora(weights, fmt, family=family), tmp, fmt)
    return files


@dataclass
class LossStats:
    """Samples seen, and the loss per noise-level bin since the last log (TensorBoard's ``loss_by_sigma``)."""

    samples: int = 0
    bins: torch.Tensor = field(default_factory=lambda: torch.zeros(LOSS_BINS))
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(LOSS_BINS))

    def add(self, per_sample: torch.Tensor, sigmas: torch.Tensor, processes: int) -> None:
        self.samples += per_sample.numel() * processes
        index = (sigmas.cpu() * LOSS_BINS).long().clamp(max=LOSS_BINS - 1)
        self.bins.index_add_(0, index, per_sample.cpu())
        self.counts.index_add_(0, index, torch.ones_like(per_sample.cpu()))

    def loss_by_sigma(self) -> dict[str, float]:
        """The mean loss of every bin that saw a sample, then empty bins for the next interval."""
        logs = {f"loss_by_sigma/{k / LOSS_BINS:.1f}-{(k + 1) / LOSS_BINS:.1f}": float(self.bins[k] / self.counts[k])
                for k in range(LOSS_BINS) if self.counts[k]}
        self.bins.zero_()
        self.counts.zero_()
        return logs


class TextCache:
    """Text sequences (and pooled vectors, for families that have them) per prompt, encoded once by the family
    (and kept on disk when a path is given)."""

    def __init__(self, pipe, max_sequence_length: int, path: Path | None = None, model: str = ""):
        self.pipe, self.max_sequence_length, self.path = pipe, max_sequence_length, path
        self.family = pipe.family
        # what produced the embeddings: a cache made by another model or token length is not reused
        self.key = {"model": model, "family": self.family.name, "max_sequence_length": max_sequence_length}
        self.sequences: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}
        if path is not None and path.exists():
            stored = torch.load(path, weights_only=True)
            if stored.get("key") == self.key:
                self.sequences, self.pooled = stored["sequences"], stored["pooled"]

    @torch.no_grad()
    def encode(self, prompts: list[str], pooled: bool) -> None:
        """Encode the prompts not yet cached (the sequence always; the pooled vector for global prompts)."""
        pooled = pooled and self.family.has_pooled
        todo = sorted({p for p in prompts if p not in self.sequences or (pooled and p not in self.pooled)})
        for start in range(0, len(todo), 16):
            chunk = todo[start:start + 16]
            for text, (seq, pool) in zip(chunk, self.family.encode_texts(self.pipe, chunk, self.max_sequence_length),
                                         strict=True):
                self.sequences[text] = seq
                if pool is not None:
                    self.pooled[text] = pool

    def save(self) -> None:
        if self.path is not None:
            with atomic_path(self.path) as tmp:
                torch.save({"key": self.key, "sequences": self.sequences, "pooled": self.pooled}, tmp)


def release_single_process_accelerator() -> None:
    """Let a new Trainer in the same (single) process pick its own precision: accelerate keeps one global state,
    which it refuses to reconfigure. Distributed runs create one Trainer per process and are left alone."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()  # internal API of accelerate: the only way to reconfigure in-process


def lr_lambda(warmup_steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return factor


def checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    found = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "trainer.json").exists()
             and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()]  # a user's checkpoint-best/ is not ours
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        config.require()
        assert config.model is not None and config.dataset is not None and config.output_dir is not None  # require()
        require_training_extra()
        from ..entities import load_layout

        for layout in config.validation_layouts:  # a bad validation layout fails now, not after the training
            load_layout(layout)
        self.config = config
        release_single_process_accelerator()
        cuda = torch.cuda.is_available()
        precision = config.mixed_precision or ("bf16" if cuda else "no")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation, mixed_precision=precision,
            log_with="tensorboard", cpu=not cuda,
            project_config=ProjectConfiguration(project_dir=str(config.output_dir), logging_dir=str(
                config.output_dir / "logs")),
        )
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            config.output_dir.mkdir(parents=True, exist_ok=True)
        self.device = self.accelerator.device
        config = self.config = self._load_model(config, precision)

        self._load_data(config)
        self.schedule = self.family.training_schedule()
        self.generator = batch_generator(config.seed, 0, 0)  # replaced by each batch's own (batches())
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config.warmup_steps))
        # the LR schedule stays ours: it steps once per optimisation step whatever the accumulation or world size
        self.model, self.optimizer = self.accelerator.prepare(self.transformer, self.optimizer)
        self.accelerator.register_save_state_pre_hook(self._save_adapter_only)
        self.accelerator.register_load_state_pre_hook(self._load_adapter_only)
        self.step = 0
        self.data_state = self.sampler.state_dict()
        assert config.dataset is not None  # require()
        self.dataset_sha256 = file_sha256(config.dataset)  # a resume compares the data by content, not by its path

    def _load_model(self, config: TrainConfig, precision: str) -> TrainConfig:
        """The pipeline in the run's precision with a fresh trainable LoRA on the family's layers; returns the config
        with what it left out filled in as for generation (the model's token length and native size)."""
        from ..pipelines import load_eligen_pipeline

        assert config.model is not None  # require()
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.pipe = load_eligen_pipeline(config.model, dtype=weight_dtype, load_default_lora=False)
        self.family = self.pipe.family
        self.edit = "edit" in self.family.card.features
        if self.edit and config.validation_layouts:
            raise ValueError(f"{self.family.card.title} is an edit model: the validation renders need an input image, "
                             "which a layout does not give; drop --validation-layouts (check the LoRA with eligen "
                             "edit)")
        # what the run leaves out is the model's, as for generation: its token length and native size
        tokens = config.max_sequence_length or pipeline_sampling_defaults(self.pipe)["max_sequence_length"]
        config = dataclasses.replace(
            config, resolution=config.resolution or max(self.pipe.native_size()), max_sequence_length=tokens)
        # require() checked these, and the replace above set the rest
        assert config.dataset is not None and config.output_dir is not None
        assert config.resolution is not None and config.max_sequence_length is not None
        self.rank = config.rank or self.family.lora_rank
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.vae.to(self.device).requires_grad_(False)
        self.transformer = self.pipe.transformer
        self.transformer.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the LoRA's initial A matrices are part of the run's determinism
            add_lora(self.transformer, self.rank, config.alpha, self.family.lora_train_names(self.transformer))
        for param in self.transformer.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # trainable LoRA weights in fp32, the frozen base in weight_dtype
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

        return config

    def _load_data(self, config: TrainConfig) -> None:
        """The dataset in buckets of the model's patch grid, this process's sampler, and the text cache."""
        from .data import BucketBatchSampler, EntityDataset

        assert config.dataset is not None and config.output_dir is not None  # require()
        assert config.resolution is not None and config.max_sequence_length is not None  # _load_model()
        multiple = self.pipe.patch_grid
        self.dataset = EntityDataset(config.dataset, config.resolution, multiple=multiple, buckets=config.buckets,
                                     max_bad_fraction=config.max_bad_fraction, max_entities=config.max_entities,
                                     edit=self.edit)
        self.sampler = BucketBatchSampler(self.dataset, config.batch_size, seed=config.seed,
                                          rank=self.accelerator.process_index,
                                          world_size=self.accelerator.num_processes)
        self.text = TextCache(self.pipe, config.max_sequence_length,
                              config.output_dir / "text_cache.pt" if config.cache_text_embeddings else None,
                              model=str(config.model))

    def _save_adapter_only(self, models, weights, output_dir) -> None:
        """Checkpoints hold the LoRA parameters, not a copy of the frozen base model (gathered on every rank: under
        FSDP each holds a shard)."""
        from safetensors.torch import save_file

        for model in models:
            weights_of = self.accelerator.unwrap_model(model).state_dict().items()
            state = {k: full_tensor(v).detach().contiguous() for k, v in weights_of if "lora_" in k}
            if self.is_main:
                save_file(state, str(Path(output_dir) / "lora_adapter.safetensors"))
        weights.clear()

    def _load_adapter_only(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(input_dir) / "lora_adapter.safetensors"))
        while models:
            missing = self.accelerator.unwrap_model(models.pop()).load_state_dict(state, strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"checkpoint {input_dir} does not match the model: {missing.unexpected_keys[:3]}")

    # -- data -------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[dict]:
        """Batches forever, epoch after epoch, from the sampler's current position (resumable)."""
        from .data import collate

        while True:
            if self.sampler.position >= len(self.sampler):  # resumed at an epoch's end: the next epoch, from 0
                self.sampler.set_epoch(self.sampler.epoch + 1)
            start = self.sampler.state_dict()
            # counted here, not by the sampler: worker processes fetch batches ahead of their use
            self.data_state = {"epoch": start["epoch"], "position": start["position"]}
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate,
                                                 num_workers=self.config.num_workers)
            for batch in loader:
                # this batch's draws, whichever process takes it: its index in the global order of the epoch
                index = self.data_state["position"] * self.sampler.world_size + self.sampler.rank
                self.generator = batch_generator(self.config.seed, start["epoch"], index)
                self.data_state["position"] += 1
                yield batch
            self.sampler.set_epoch(start["epoch"] + 1)

    def encode_batch(self, batch: dict):
        """Latents ``(B, n_img, C)``, the image geometry, the positive branch (text sequence, pooled vectors, text
        positions, regional mask) and, for edit records, the input images' reference tokens (else None) for one
        batch. Segments of unequal lengths in the batch are padded after their text; the family's padding rule says
        how the padding is masked. The reference tokens are image tokens every real entity covers (as at inference);
        padded and dropped entities cover nothing."""
        config, pipe, family = self.config, self.pipe, self.family
        images = batch["images"].to(self.device, pipe.vae.dtype)
        x0 = family.encode_image(pipe, images).float()
        b = x0.shape[0]
        lat_h, lat_w = latent_grid_size(images.shape[2], images.shape[3], pipe.vae_scale_factor, family.patch_size)
        geometry = family.geometry(pipe, b, lat_h, lat_w, self.device, x0.dtype)
        prompts, entity_prompts = batch["prompts"], batch["entity_prompts"]
        reference, instructions = self.edit_references(batch)
        n = max((len(e) for e in entity_prompts), default=0)
        self.text.encode([*(prompts if instructions is None else []), *(p for e in entity_prompts for p in e)],
                         pooled=True)
        global_seq, global_valid = pad_stack(instructions or [self.text.sequences[p] for p in prompts])
        pooled = torch.stack([self.text.pooled[p] for p in prompts]).to(self.device) if family.has_pooled else None
        segments = [pad_stack([self.text.sequences[e[i]] for e in entity_prompts]) for i in range(n)]
        sequence = TokenSequence.of([s.shape[1] for s, _ in segments], global_seq.shape[1])
        context = sequence.join([s for s, _ in segments], global_seq).to(self.device)
        valid = sequence.text_valid(global_valid, [v for _, v in segments]).to(self.device)
        cover = pixel_masks_to_covers(batch["entity_masks"], pipe.vae_scale_factor, family.patch_size)
        keep = torch.rand(b, generator=self.generator) >= config.drop_entities  # global-only samples
        if reference is not None:
            real = torch.arange(n)[None, :] < torch.tensor(batch["entity_counts"])[:, None]  # (B, N)
            cover = reference_cover(cover, reference.tokens) & real[..., None]
        cover = cover & keep[:, None, None]
        regional = sequence.mask(cover).to(self.device) if n else None
        text_mask, mask = family.padding(sequence, None if valid.all() else valid, regional)
        positions = family.positions(sequence, self.device, torch.float32)
        return x0, geometry, Branch(context, pooled, text_mask, mask, positions, sequence), reference

    @torch.no_grad()
    def edit_references(self, batch: dict) -> tuple[ReferenceTokens | None, list[torch.Tensor] | None]:
        """The batch's input images as the edit pipeline makes its reference tokens (``edit_reference``), one
        sample at a time, stacked (every sample of a batch has one bucket, so one reference size); and each
        instruction ``(T_i, D)`` where the pipeline encodes it with its input image (else None, the text cache's).
        ``(None, None)`` for a batch without edit records."""
        if "input_images" not in batch:
            return None, None
        from PIL import Image

        made = [self.pipe.edit_reference(Image.fromarray(pixels.permute(1, 2, 0).numpy()), prompt, 1, self.device,
                                         self.pipe.vae.dtype)
                for pixels, prompt in zip(batch["input_images"], batch["prompts"], strict=True)]
        instructions = [r.context[0].cpu() for r in made if r.context is not None]
        return ReferenceTokens(torch.cat([r.packed for r in made]), made[0].extend), instructions or None

    # -- one step -------------------------------------------------------------------------------------

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x0, geometry, branch, reference = self.encode_batch(batch)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        sigmas, weights = sample_sigmas(x0.shape[0], self.config.timestep_sampling, self.generator, self.schedule)
        sigmas, weights = sigmas.to(self.device), weights.to(self.device)
        x_t = noisy_latents(x0, noise, sigmas)
        guidance = None  # only guidance-distilled transformers take the embedded guidance value
        if getattr(self.transformer.config, "guidance_embeds", False):  # a config without the key has none
            guidance = torch.full((x0.shape[0],), self.config.guidance, device=self.device)
        tokens, joined = (x_t, geometry) if reference is None else reference.join(x_t, geometry)
        with self.accelerator.autocast():
            prediction = self.family.forward(self.model, tokens, sigmas, branch, joined, guidance)
        per_sample = per_sample_loss(prediction[:, : x0.shape[1]], x0, noise)  # the image tokens only
        return flow_loss(per_sample, weights), per_sample.detach(), sigmas.detach()

    # -- checkpoints ------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Adapter, optimizer, LR schedule and data position, written to a temp dir then renamed."""
        assert self.config.output_dir is not None  # checked by require() in __init__
        final = self.config.output_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = self.config.output_dir / f".tmp-{CHECKPOINT_PREFIX}{self.step}"
        self.accelerator.wait_for_everyone()
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        try:
            self._write_state(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint stays behind
            raise
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoints(self.config.output_dir)[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _write_state(self, tmp: Path) -> None:
        """A checkpoint's files into ``tmp``: accelerate's state, each rank's data position, the run."""
        self.accelerator.save_state(str(tmp))
        tmp.mkdir(parents=True, exist_ok=True)  # every rank writes its own state file into it
        rank = self.accelerator.process_index
        torch.save({"sampler": dict(self.data_state),
                    "lr_schedule": self.lr_schedule.state_dict()}, tmp / f"eligen_state_{rank}.pt")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "config": jsonable_config(self.config),
                                                          "dataset_sha256": self.dataset_sha256,
                                                          "random_draws": RANDOM_DRAWS}))

    def start_or_resume(self) -> None:
        """Resume from the newest readable checkpoint (an unreadable one is skipped, with a note), refusing changed
        options by name; a fresh run refuses a folder holding another run's checkpoints unless ``overwrite``."""
        assert self.config.output_dir is not None  # checked by require() in __init__
        config, found = self.config, checkpoints(self.config.output_dir)
        if not config.resume:
            if found and not config.overwrite:
                raise ValueError(f"{config.output_dir} holds another run's checkpoints ({found[-1].name}); continue "
                                 "it with --resume, or start afresh with --overwrite (deletes them)")
            if self.is_main:
                for old in found:
                    shutil.rmtree(old)
            self.accelerator.wait_for_everyone()
            return
        for path in reversed(found):
            try:
                record = json.loads((path / "trainer.json").read_text())
                stored = record["config"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"note: skipping {path.name}, its record is unreadable ({exc})", file=sys.stderr)
                continue
            if record.get("random_draws") != RANDOM_DRAWS:
                raise ValueError(f"{path.name} was written by an older eligen that drew each process's noise from one "
                                 "stream; this one draws per batch (docs/design.md section 6.1), so the run cannot go "
                                 "on as it began: start afresh with --overwrite, or finish it with the older eligen")
            changed = changed_options(stored, config, record.get("dataset_sha256") == self.dataset_sha256)
            if changed:
                raise ValueError(f"--resume with options changed since {path.name}: {', '.join(changed)}; rerun "
                                 "with the checkpoint's values, or start a new run in another output_dir")
            try:
                self.load_checkpoint(path)
                return
            except Exception as exc:  # a checkpoint cut short (disk full, a kill mid-write): fall back
                print(f"note: skipping {path.name}, it cannot be loaded ({type(exc).__name__}: {exc})",
                      file=sys.stderr)
        if found:
            raise ValueError(f"none of the checkpoints in {config.output_dir} can be loaded")

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        state = torch.load(path / f"eligen_state_{self.accelerator.process_index}.pt", weights_only=False)
        self.sampler.load_state_dict(state["sampler"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step = json.loads((path / "trainer.json").read_text())["step"]

    # -- validation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Render the validation layouts with the current LoRA into one overlay grid PNG (main process)."""
        if not self.is_main or not self.config.validation_layouts:
            return None
        from ..entities import load_layout
        from ..overlay import image_grid, render_overlay

        tiles = []
        was_training = self.model.training
        self.model.eval()
        for path in self.config.validation_layouts:
            layout = load_layout(path)
            image = self.pipe(prompt=layout.prompt, entities=layout.entities, height=layout.height,
                              width=layout.width, num_inference_steps=self.config.validation_steps,
                              guidance_scale=self.config.validation_guidance,
                              max_sequence_length=self.config.max_sequence_length,
                              generator=torch.Generator().manual_seed(layout.seed or 0)).images[0]
            tiles.append(render_overlay(image, layout.masks(), [e.prompt for e in layout.entities]))
        self.model.train(was_training)
        assert self.config.output_dir is not None  # checked by require() in __init__
        out = self.config.output_dir / "validation" / f"step-{self.step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(tiles).save(out)
        return out

    # -- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        config = self.config
        assert config.output_dir is not None  # checked by require() in __init__
        self.start_or_resume()
        self.accelerator.init_trackers("eligen", config={k: str(v) for k, v in asdict(config).items()})
        result = TrainResult(steps=self.step)
        interrupted = {"flag": False}
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):  # finish the step, save, then stop
            interrupted["flag"] = True

        if self.is_main:
            signal.signal(signal.SIGINT, on_interrupt)
        progress = tqdm(total=config.max_steps, initial=self.step, disable=not (self.is_main and config.progress),
                        desc="train")
        data = self.batches()
        self.model.train()
        started, stats = time.perf_counter(), LossStats()
        try:
            while self.step < config.max_steps and not interrupted["flag"]:
                step_loss = self._optimisation_step(data, stats)
                result.losses.append(step_loss)
                rate = stats.samples / max(time.perf_counter() - started, 1e-9)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", samples_per_s=f"{rate:.2f}")
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    self.accelerator.log({"loss": step_loss, "lr": self.lr_schedule.get_last_lr()[0],
                                          "samples_per_s": rate, **stats.loss_by_sigma()}, step=self.step)
                if self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                if config.validate_every and self.step % config.validate_every == 0:
                    self.validate()
        except KeyboardInterrupt:
            interrupted["flag"] = True
        finally:
            progress.close()
            if self.is_main:
                signal.signal(signal.SIGINT, previous)
        result.steps = self.step
        return self._finish(result, interrupted["flag"])

    def _optimisation_step(self, data: Iterator[dict], stats: LossStats) -> float:
        """One optimisation step over ``gradient_accumulation`` micro-batches; returns its loss, averaged over the
        processes."""
        step_loss = 0.0
        for _ in range(self.config.gradient_accumulation):
            batch = next(data)
            with self.accelerator.accumulate(self.model):
                loss, per_sample, sigmas = self.loss(batch)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad()
            step_loss += loss.item() / self.config.gradient_accumulation
            stats.add(per_sample, sigmas, self.accelerator.num_processes)
        self.lr_schedule.step()
        self.step += 1
        # the mean over the processes, as the averaged gradients: W processes log one process's curve
        return self.accelerator.reduce(torch.tensor(step_loss, device=self.device), reduction="mean").item()

    def _finish(self, result: TrainResult, interrupted: bool) -> TrainResult:
        """A checkpoint, then (unless interrupted) the LoRA files and the final validation grid."""
        config = self.config
        assert config.output_dir is not None  # require()
        if interrupted:
            result.interrupted = True
            self.save_checkpoint()
            self.accelerator.end_training()
            return result
        if self.step % config.checkpoint_every:
            self.save_checkpoint()
        alpha = config.alpha if config.alpha is not None else self.rank
        weights = lora_weights_from_model(self.accelerator.unwrap_model(self.model), alpha)  # every rank (FSDP)
        if self.is_main:  # the LoRA first: a failing validation render must not cost the training
            self.text.save()
            result.lora_files = save_lora_files(weights, config.output_dir, self.family.name)
        if not config.validate_every or self.step % config.validate_every:
            try:
                self.validate()
            except Exception as exc:
                self.accelerator.end_training()
                raise ValueError(f"the validation render failed ({type(exc).__name__}: {exc}); the trained LoRA is "
                                 f"saved: {result.lora_files.get('diffusers')}") from exc
        self.accelerator.end_training()
        return result


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def refused_write(exc: BaseException) -> str | None:
    """Why the system refused a write (a full disk, a read-only or forbidden folder), whoever wrote: eligen,
    accelerate's trackers, torch.save or safetensors; None for any other error."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    if type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and "file write failed" in str(exc)):
        return str(exc)
    return None


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says; a write the system refuses is one line naming the output folder and why (the
    checkpoint being written is removed, the last complete one kept)."""
    try:
        return Trainer(config).train()
    except Exception as exc:
        reason = refused_write(exc)
        if reason is None:
            raise
        raise ValueError(f"cannot write {config.output_dir}: {reason}; free space or choose another folder (the last "
                         "complete checkpoint is kept: rerun with --resume to go on)") from None

