"""Same seed, same outputs: record the outputs of a fixed set of calls, or compare them with a record.

A refactor must leave every image bit-identical. ``record`` writes tiny random pipelines of both families (and their
LoRAs, an IP-Adapter, a training set) into a folder and the outputs of ~60 calls through the public API beside them
(latents, decoded images, a short training run's losses and LoRA); ``compare`` reloads the same files, reruns the
same calls with the code checked out now, and names every output that is not bit-identical::

    python benchmarks/snapshot_outputs.py record /tmp/snap     # on the old commit
    python benchmarks/snapshot_outputs.py compare /tmp/snap    # on the new one: exit 0 when all equal

Only public names are used (``eligen.EliGenPipeline``, ``eligen.EliGenQwenImagePipeline``, ``eligen.Entity``,
``eligen.reference_sigmas``, ``eligen.speedups``, the ``eligen`` CLI), so both sides run the same script.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

torch.set_num_threads(1)
logging.disable(logging.WARNING)  # the tiny sizes are far from the models' native ones, by design
H = W = 32


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blob_mask() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - 20) ** 2 + (xx - 12) ** 2) < 60


def entities(**extra):
    from eligen import Entity

    return [Entity("a red square", box=(2, 2, 18, 16), **extra), Entity("a blue round ball", mask=blob_mask()),
            Entity("green grass", polygon=[(16, 18), (31, 20), (28, 31), (18, 30)])]


def input_image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def build(folder: Path) -> None:
    """The pipelines, LoRAs, IP-Adapter and training set every later compare loads."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from eligen.families.flux.testing import save_tiny_ip_adapter
    from eligen.families.flux.testing import save_tiny_pipeline as save_flux
    from eligen.families.qwen_image.testing import save_tiny_pipeline as save_qwen
    from eligen.tiny.toy_data import write_box_dataset

    save_flux(folder / "flux", seed=0)
    save_qwen(folder / "qwen", seed=0)
    from diffusers import FluxPipeline, QwenImagePipeline
    from safetensors.torch import save_file

    for name, cls, targets in (("flux", FluxPipeline, ["to_q", "to_k", "to_v", "proj_out", "ff.net.2"]),
                               ("qwen", QwenImagePipeline, ["to_q", "to_k", "add_v_proj", "img_mod.1"])):
        for i, seed in enumerate((1, 2)):
            pipe = cls.from_pretrained(folder / name)
            torch.manual_seed(seed)
            pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=2 + i, init_lora_weights="gaussian",
                                                    target_modules=targets[i:]))
            with torch.no_grad():
                for pname, param in pipe.transformer.named_parameters():
                    if "lora_B" in pname:
                        param.normal_(0, 0.3, generator=gen(seed))
            state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(pipe.transformer).items()}
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{name}_lora{i}.safetensors"))
    transformer = FluxPipeline.from_pretrained(folder / "flux").transformer
    save_tiny_ip_adapter(folder / "ip", transformer.config, seed=0)
    write_box_dataset(folder / "data", 8, 32, 32, seed=1)


def calls(folder: Path) -> dict[str, Callable[[], object]]:
    """name -> a call whose output must not change."""
    from eligen import EliGenPipeline, EliGenQwenImagePipeline, Entity, reference_sigmas

    pipes = {}

    def pipe(family: str):
        if family not in pipes:
            cls = EliGenPipeline if family == "flux" else EliGenQwenImagePipeline
            p = cls.from_pretrained(folder / family)
            p.set_progress_bar_config(disable=True)
            pipes[family] = p
        return pipes[family]

    def run(family: str, **kwargs):
        base = dict(prompt="a red square and a blue ball on grass", height=H, width=W, num_inference_steps=3,
                    generator=gen(0), output_type="latent", max_sequence_length=16)
        return pipe(family)(**{**base, **kwargs}).images

    out: dict[str, Callable[[], object]] = {}
    for family in ("flux", "qwen"):
        f = family
        out[f"{f}/plain"] = lambda f=f: run(f)
        out[f"{f}/plain-cfg"] = lambda f=f: run(f, negative_prompt="blurry", true_cfg_scale=2.5)
        out[f"{f}/plain-pil"] = lambda f=f: np.asarray(run(f, output_type="pil")[0])
        for attention in ("dense", "flex", "segmented"):
            out[f"{f}/entities-{attention}"] = lambda f=f, a=attention: run(f, entities=entities(), attention=a)
            out[f"{f}/entities-cfg-{attention}"] = lambda f=f, a=attention: run(
                f, entities=entities(), attention=a, negative_prompt="blurry", true_cfg_scale=3.0)
            out[f"{f}/entities-on-negative-{attention}"] = lambda f=f, a=attention: run(
                f, entities=entities(), attention=a, negative_prompt="blurry", true_cfg_scale=3.0,
                entities_on_negative=True)
        for mode in ("plain", "rescaled"):
            out[f"{f}/cfg-mode-{mode}"] = lambda f=f, m=mode: run(f, entities=entities(), negative_prompt="dull",
                                                                  true_cfg_scale=4.0, cfg_mode=m)
        out[f"{f}/trim"] = lambda f=f: run(f, entities=entities(), entity_tokens="trim")
        out[f"{f}/entity-steps"] = lambda f=f: run(f, entities=entities(), entity_steps=1, num_inference_steps=4,
                                                   negative_prompt="x", true_cfg_scale=2.0, entities_on_negative=True)
        out[f"{f}/reference-sigmas"] = lambda f=f: run(f, entities=entities(), sigmas=reference_sigmas(4),
                                                       shift_sigmas=False)
        out[f"{f}/batch"] = lambda f=f: run(f, prompt=["a cat", "a dog on grass"], num_images_per_prompt=2,
                                            entities=entities(), attention="dense")
        out[f"{f}/pil-entities"] = lambda f=f: np.asarray(run(f, entities=entities(), output_type="pil")[0])
        out[f"{f}/np-entities"] = lambda f=f: run(f, entities=entities(), output_type="np")
        for fusion in ("exact", "paper"):
            out[f"{f}/inpaint-{fusion}"] = lambda f=f, u=fusion: run(
                f, entities=entities(), image=input_image(), inpaint=True, fusion=u, negative_prompt="blurry",
                true_cfg_scale=2.0)
        out[f"{f}/inpaint-options"] = lambda f=f: run(f, entities=entities()[:2], image=input_image(), inpaint=True,
                                                      strength=0.7, mask_dilate=1, mask_blur=1.0, output_type="pil")
        out[f"{f}/inpaint-no-paste"] = lambda f=f: run(f, entities=entities()[1:], image=input_image(), inpaint=True,
                                                       paste_back=False, output_type="np")
        out[f"{f}/inpaint-odd-size"] = lambda f=f: run(f, entities=[Entity("a cat", box=(3, 3, 20, 25))],
                                                       image=input_image()[:30, :27], inpaint=True, height=None,
                                                       width=None, output_type="np")

        def callback(p, i, t, tensors):
            return {"latents": tensors["latents"] * 0.9}

        out[f"{f}/callback"] = lambda f=f: run(f, entities=entities(), callback_on_step_end=callback)

        def lora_stack(f=f):
            p = pipe(f)
            name = "flux" if f == "flux" else "qwen"
            p.load_eligen_lora(folder / f"{name}_lora0.safetensors", adapter_name="a")
            p.load_eligen_lora(folder / f"{name}_lora1.safetensors", adapter_name="b", scale=0.5)
            try:
                return torch.cat([run(f, entities=entities()), run(f)], dim=1)
            finally:
                p.delete_adapters(["a", "b"])

        out[f"{f}/lora-stack"] = lora_stack

        def speedups(f=f):
            from eligen import speedups as s

            p = pipe(f)
            hooks = s.mask_only_in_blocks(p, s.every_nth_block(p, 2))
            masked = run(f, entities=entities(), attention="dense")
            hooks.remove()
            s.enable_first_block_cache(p, 0.5)
            cached = run(f, entities=entities(), negative_prompt="x", true_cfg_scale=2.0, num_inference_steps=5)
            s.disable_step_cache(p)
            return torch.cat([masked, cached], dim=1)

        out[f"{f}/speedups"] = speedups

    def low_level():
        p = pipe("flux")
        embeds, pooled, _ = p.encode_prompt("a scene", prompt_2=None, max_sequence_length=16)
        ent = [p.encode_prompt(t, prompt_2=None, max_sequence_length=16)[0][0] for t in ("a", "b b")]
        return p(prompt_embeds=embeds, pooled_prompt_embeds=pooled, entity_prompt_embeds=ent,
                 entity_masks=[blob_mask(), ~blob_mask()], height=H, width=W, num_inference_steps=3,
                 generator=gen(1), output_type="latent", max_sequence_length=16).images

    out["flux/low-level"] = low_level

    def ip_adapter():
        p = EliGenPipeline.from_pretrained(folder / "flux")
        p.set_progress_bar_config(disable=True)
        p.load_ip_adapter(str(folder / "ip"), weight_name="ip_adapter.safetensors",
                          image_encoder_pretrained_model_name_or_path=str(folder / "ip" / "image_encoder"))
        ref = input_image()
        ents = entities()
        ents[1].image = np.ascontiguousarray(ref[::-1])
        ents[1].image_scale = 0.7
        outs = []
        for attention in ("dense", "flex", "segmented"):
            outs.append(p(prompt="a scene", entities=ents, ip_adapter_image=ref, height=H, width=W,
                          num_inference_steps=3, generator=gen(0), output_type="latent", max_sequence_length=16,
                          negative_prompt="x", true_cfg_scale=2.0, attention=attention).images)
        return torch.cat(outs, dim=1)

    out["flux/ip-adapter"] = ip_adapter

    def cli_generate():
        from eligen.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "demo.png"
            here = Path(__file__).resolve().parents[1]
            assert main(["generate", str(here / "examples" / "tiny_two_shapes.json"), "-o", str(target),
                         "--no-progress", "--seed", "7"]) == 0
            from PIL import Image

            return np.asarray(Image.open(target).convert("RGB"))

    out["cli/eligen-tiny"] = cli_generate

    for family in ("flux", "qwen"):
        def training(f=family):
            from safetensors.torch import load_file

            from eligen.train.config import TrainConfig
            from eligen.train.trainer import train

            with tempfile.TemporaryDirectory() as tmp:
                config = TrainConfig(model=str(folder / f), dataset=folder / "data" / "data.jsonl",
                                     output_dir=Path(tmp) / "out", resolution=32, rank=4, max_steps=3, batch_size=2,
                                     checkpoint_every=100, max_sequence_length=16, log_every=1, learning_rate=1e-3,
                                     progress=False)
                result = train(config)
                lora = load_file(str(Path(tmp) / "out" / "eligen_lora.safetensors"))
                return {"losses": torch.tensor(result.losses, dtype=torch.float64), **lora}

        out[f"{family}/train"] = training
    return out


def as_tensors(value) -> dict[str, torch.Tensor]:
    if isinstance(value, dict):
        return {k: torch.as_tensor(v) for k, v in value.items()}
    if isinstance(value, list):  # PIL images
        value = np.stack([np.asarray(image) for image in value])
    if isinstance(value, np.ndarray):
        return {"": torch.from_numpy(np.ascontiguousarray(value))}
    return {"": value.detach().cpu()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--only", default="", help="run only the calls whose name contains this")
    args = parser.parse_args()
    record = args.folder / "outputs.pt"
    if args.mode == "record":
        args.folder.mkdir(parents=True, exist_ok=True)
        if not (args.folder / "flux").exists():
            build(args.folder)
        stored = {}
    else:
        stored = torch.load(record)
    results, failures = {}, []
    for name, call in calls(args.folder).items():
        if args.only not in name:
            continue
        value = as_tensors(call())
        results[name] = value
        if args.mode == "compare":
            expected = stored.get(name)
            same = expected is not None and expected.keys() == value.keys() and all(
                expected[k].dtype == value[k].dtype and expected[k].shape == value[k].shape
                and torch.equal(expected[k], value[k]) for k in value)
            print(f"{'same' if same else 'DIFFERENT':9} {name}", flush=True)
            if not same:
                failures.append(name)
        else:
            print(f"recorded  {name}", flush=True)
    if args.mode == "record":
        torch.save(results, record)
        print(f"{len(results)} outputs -> {record}")
        return 0
    print(f"{len(results) - len(failures)} of {len(results)} outputs bit-identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
