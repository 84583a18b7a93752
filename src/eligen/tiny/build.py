"""`eligen tiny build`: the embedded default model, trained from scratch on the shapes world (docs/design.md section 8).

Three stages, deterministic given the seed: a small VAE (scale factor 2, so 64x64 images make 16x16 = 256
tokens), a small FluxTransformer2DModel trained as a text-to-image base together with its tiny CLIP and T5
encoders on global captions only (10% empty captions, for true CFG), then an EliGen LoRA trained with
`eligen train` on entity boxes. The result is a complete diffusers FluxPipeline directory plus the LoRA.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from eligen.families.base import Branch
from eligen.families.flux.model import FLUX, vae_latents

from ..config import jsonable
from ..models import DEFAULTS_FILE
from ..train.loss import flow_loss, noisy_latents, per_sample_loss
from .build_config import TinyBuildConfig
from .tokenizers import DEFAULT_WORDS, build_clip_tokenizer, build_t5_tokenizer
from .world import BACKGROUNDS, COLOURS, SHAPES, sample

if TYPE_CHECKING:  # for mypy `from diffusers import ...` is diffusers' torch-less dummy class, without the methods
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
else:
    from diffusers import AutoencoderKL, FluxPipeline

LORA_FILE = "eligen_lora.safetensors"
WORDS = sorted({*DEFAULT_WORDS, *COLOURS, *SHAPES, *BACKGROUNDS, "a", "and", "on", "background"})


def world_batch(seeds: range | list[int], size: int) -> tuple[torch.Tensor, list[str]]:
    """World images ``(B, 3, size, size)`` in [-1, 1] and their captions."""
    samples = [sample(s, size) for s in seeds]
    images = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2), [s.caption for s in samples]


def build_components(seed: int, max_sequence_length: int) -> dict:
    """Untrained tiny FluxPipeline components (tokenizers built from the world's words)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(WORDS), build_t5_tokenizer(WORDS, max_sequence_length)
    eos = cast(int, tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # one token in, one id out
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=cast(int, tokenizer.convert_tokens_to_ids(
            "<|startoftext|>")), eos_token_id=eos, pad_token_id=eos))
    text_encoder_2 = T5EncoderModel(T5Config(  # type: ignore[call-arg]  # @strict config: extra keys go to **kwargs
        vocab_size=len(tokenizer_2), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2, "transformer": transformer}


def train_vae(vae: AutoencoderKL, config: TinyBuildConfig) -> list[float]:
    """Reconstruction (+ a small KL) on world images; sets the latent scaling to unit variance at the end."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    vae.train()
    for step in tqdm(range(config.vae_steps), desc="vae", disable=not config.progress):
        images, _ = world_batch(range(step * config.vae_batch_size, (step + 1) * config.vae_batch_size), config.size)
        posterior = vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        images, _ = world_batch(range(10**7, 10**7 + 64), config.size)
        z = vae.encode(images).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return losses


def encode_world(vae: AutoencoderKL, seeds: range, size: int, batch_size: int,
                 progress: bool) -> tuple[torch.Tensor, list[str]]:
    """Scaled VAE latents ``(len(seeds), C, size/2, size/2)`` of world images and their captions, encoded once."""
    latents, captions = [], []
    for start in tqdm(range(0, len(seeds), batch_size), desc="encode", disable=not progress):
        images, batch_captions = world_batch(seeds[start:start + batch_size], size)
        latents.append(vae_latents(vae, images))
        captions.extend(batch_captions)
    return torch.cat(latents), captions


def train_base(pipe: FluxPipeline, config: TinyBuildConfig) -> list[float]:
    """Rectified-flow text-to-image training of the transformer and both text encoders on global captions.

    The world images are encoded once (``base_samples`` of them, fewer when the run sees fewer) and drawn in a
    fresh random order each epoch.
    """
    params = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters(), *pipe.text_encoder_2.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.base_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) *
                                                 0.5 * (1 + math.cos(math.pi * s / config.base_steps)))
    generator = torch.Generator().manual_seed(config.seed + 2)
    offset = 2 * 10**6  # world seeds of the base stage (the VAE used 0.., the LoRA data uses 4e6..)
    count = min(config.base_samples, config.base_steps * config.batch_size)
    bank, bank_captions = encode_world(pipe.vae, range(offset, offset + count), config.size, 32, config.progress)
    order = torch.empty(0, dtype=torch.long)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.train()
    losses = []
    bar = tqdm(range(config.base_steps), desc="base", disable=not config.progress)
    for step in bar:
        while len(order) < config.batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        index, order = order[:config.batch_size], order[config.batch_size:]
        z = bank[index]
        drop = torch.rand(len(index), generator=generator) < 0.1
        captions = ["" if d else bank_captions[i] for i, d in zip(index.tolist(), drop.tolist(), strict=True)]
        b, c, h, w = z.shape
        x0 = pipe._pack_latents(z, b, c, h, w)
        ids = FLUX.geometry(pipe, b, h, w, x0.device, x0.dtype)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(captions, None,
                                                             max_sequence_length=config.max_sequence_length)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(b, generator=generator))
        x_t = noisy_latents(x0, noise, sigma)
        prediction = FLUX.forward(pipe.transformer, x_t, sigma, Branch(prompt_embeds, pooled, positions=text_ids),
                                  ids, guidance=None)
        loss = flow_loss(per_sample_loss(prediction, x0, noise), torch.ones(b))  # the trainer's loss, unweighted
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 49:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    return losses


def write_lora_dataset(folder: Path, count: int, size: int, first_seed: int) -> Path:
    """World samples as the trainer's JSONL with entity boxes (the paper trains on boxes only)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        world = sample(first_seed + i, size)
        name = f"images/{i:05d}.png"
        world.image.save(folder / name)
        lines.append({"image": name, "prompt": world.caption,
                      "entities": [{"prompt": o.prompt, "box": list(o.box)} for o in world.objects]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def build(config: TinyBuildConfig) -> Path:
    """Train all three stages and write the pipeline directory (with the LoRA and the defaults file)."""
    from eligen.train.trainer import TrainConfig, train

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    pipe = FluxPipeline(**build_components(config.seed, config.max_sequence_length))
    vae_losses = train_vae(pipe.vae, config)
    pipe.vae.requires_grad_(False)
    base_losses = train_base(pipe, config)
    base_dir = config.out
    pipe.save_pretrained(base_dir)
    work = base_dir.parent / f".{base_dir.name}-lora-work"
    data = write_lora_dataset(work / "data", config.lora_samples, config.size, first_seed=4 * 10**6)
    result = train(TrainConfig(
        model=str(base_dir), dataset=data, output_dir=work / "run", resolution=config.size, buckets=False,
        rank=config.lora_rank, learning_rate=config.lora_learning_rate, warmup_steps=50, max_steps=config.lora_steps,
        batch_size=config.lora_batch_size, guidance=1.0, max_sequence_length=config.max_sequence_length,
        drop_entities=0.1, checkpoint_every=max(1, config.lora_steps), log_every=50, seed=config.seed,
        cache_text_embeddings=True, progress=config.progress,
    ))
    (base_dir / LORA_FILE).write_bytes(result.lora_files["diffusers"].read_bytes())
    defaults = {"max_sequence_length": config.max_sequence_length, "steps": 20, "true_cfg": 3.0, "guidance": 3.5,
                "lora": LORA_FILE, "native_size": [config.size, config.size]}
    (base_dir / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=1))
    report = {"config": jsonable(config), "minutes": (time.perf_counter() - started) / 60,
              "vae_loss_last": float(np.mean(vae_losses[-20:])), "base_loss_last": float(np.mean(base_losses[-20:])),
              "lora_loss_last": float(np.mean(result.losses[-20:]))}
    (base_dir / "build_report.json").write_text(json.dumps(report, indent=1))
    return base_dir
