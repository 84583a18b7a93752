"""`eligen ...`: the command line. It imports the library; the library never imports it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from functools import partial

from . import __version__
from .config import add_dataclass_arguments, config_from_mapping
from .data.annotate import AnnotateConfig
from .data.generate import DataGenerateConfig
from .data.plan import PlanConfig
from .entities import LayoutError
from .evals.harness import CocoMigConfig, LayoutSamConfig
from .generate import GenerateConfig, InpaintConfig, checked_record, generate, read_metadata
from .lora import (
    LoraConvertConfig,
    LoraFormatError,
    LoraInfoConfig,
    convert_lora_file,
    format_info,
    load_state_dict,
    lora_info,
)
from .tiny.bench import BenchConfig
from .tiny.build_config import TinyBuildConfig
from .tiny.shipped import model_defaults
from .train.config import TrainConfig
from .ui.config import UIConfig

DESCRIPTION = "eligen: entity-level controlled image generation (EliGen) with diffusers FLUX.1 and Qwen-Image."
GENERATE_EPILOG = """examples:
  eligen generate layout.json -o out.png --model ./FLUX.1-dev --lora modelscope/EliGen --overlay
  eligen generate layout.json -o out.png --model ./FLUX.1-dev --lora eligen.safetensors --lora style.safetensors \\
      --lora-scale 1.0 --lora-scale 0.6
  eligen generate layout.json -o out.png --model Qwen/Qwen-Image --lora DiffSynth-Studio/Qwen-Image-EliGen-V2 \
      --true-cfg 4 --steps 40
  eligen generate --from out.png -o again.png          # reproduce from the PNG's metadata
  eligen generate --from out.png -o bigger.png --steps 60
"""

INPAINT_EPILOG = """examples:
  eligen inpaint photo.png layout.json -o out.png --model ./FLUX.1-dev --lora modelscope/EliGen --overlay
  eligen inpaint photo.png layout.json -o out.png --model ./FLUX.1-dev --fusion paper --mask-blur 1.5
"""
COMMAND_CONFIGS = {"generate": GenerateConfig, "inpaint": InpaintConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eligen", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"eligen {__version__}")
    parser.add_argument("--verbose", action="store_true", default=None,
                        help="show the libraries' warnings, logs and loading bars (hidden by default)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="render a layout JSON file to a PNG", description="Render a layout JSON file to a PNG. "
        "The PNG stores the layout and every parameter, so --from reproduces it.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(gen, GenerateConfig)
    gen.set_defaults(handler=partial(run_render, "generate"))

    inp = commands.add_parser(
        "inpaint", help="repaint the entities' regions of an image in one pass (inpainting fusion)",
        description="Repaint the regions of INPUT marked by the layout's entities, all in one denoising pass; "
        "everything else stays the input (byte for byte with paste-back). The layout's width/height default to "
        "the input's size.", epilog=INPAINT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(inp, InpaintConfig)
    inp.set_defaults(handler=partial(run_render, "inpaint"))

    trainer = commands.add_parser(
        "train", help="train an EliGen LoRA on entity-annotated data",
        description="Train an EliGen LoRA (the paper's recipe: rank-64 LoRA on every block linear, AdamW, "
        "rectified flow) under accelerate. Any field can come from CONFIG.yaml; flags override it. For several "
        "GPUs or DeepSpeed ZeRO-2: accelerate launch --config_file configs/accelerate_deepspeed_zero2.yaml "
        "-m eligen.cli train CONFIG.yaml",
    )
    add_dataclass_arguments(trainer, TrainConfig)
    trainer.set_defaults(handler=run_train)

    data = commands.add_parser("data", help="build EliGen training data: generate images, annotate them with a VLM",
                               description="Build EliGen training data the paper's way: images from captions with "
                               "any FLUX.1 or Qwen-Image model, then a grounding VLM writes captions and entity boxes.")
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    data_generate = data_commands.add_parser(
        "generate", help="images from captions (txt or jsonl), resumable and shardable (--shard i/n)",
        description="Render captions with any diffusers FLUX.1 or Qwen-Image model into OUT/images; finished images "
        "are skipped, writes are atomic, --shard i/n (or accelerate/torchrun's RANK/WORLD_SIZE) splits the work.")
    add_dataclass_arguments(data_generate, DataGenerateConfig)
    data_generate.set_defaults(handler=run_data_generate)
    data_annotate = data_commands.add_parser(
        "annotate", help="caption + entity boxes for every image with a grounding VLM -> the trainer's JSONL",
        description="Ask a grounding VLM (an OpenAI-compatible server such as vLLM or SGLang, or a local "
        "Qwen2-VL / Qwen2.5-VL through transformers) for a caption and entities with boxes for each image of "
        "FOLDER/images; malformed answers are retried, failures recorded, finished images skipped; writes "
        "FOLDER/annotations.jsonl and a contact sheet.")
    add_dataclass_arguments(data_annotate, AnnotateConfig)
    data_annotate.set_defaults(handler=run_data_annotate)

    planner = commands.add_parser(
        "plan", help="plan a layout from text with a grounding MLLM",
        description="Turn a description into a global prompt and entities with boxes, written as a layout file "
        "that `eligen generate` renders.")
    add_dataclass_arguments(planner, PlanConfig)
    planner.set_defaults(handler=run_plan)

    tiny = commands.add_parser("tiny", help="the embedded default model", description="The embedded default model.")
    tiny_commands = tiny.add_subparsers(dest="tiny_command", metavar="COMMAND", required=True)
    tiny_build = tiny_commands.add_parser(
        "build", help="train the tiny shapes-world model from scratch (VAE, base, EliGen LoRA)",
        description="Train the tiny default model from scratch on the shapes world: a small VAE, a text-to-image "
        "base on global captions, then an EliGen LoRA with `eligen train` on entity boxes. Deterministic given "
        "--seed; about 99 minutes on 2 CPU cores with the defaults (measured for the shipped model).")
    add_dataclass_arguments(tiny_build, TinyBuildConfig)
    tiny_build.set_defaults(handler=run_tiny_build)

    bench = commands.add_parser("bench", help="benchmarks of entity control",
                                description="Benchmarks of entity control.")
    bench_commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    shapes = bench_commands.add_parser(
        "shapes", help="ShapesBench: mask IoU, colour accuracy and recall on held-out shapes-world layouts",
        description="ShapesBench: held-out layouts with 1-4 entities (box, ellipse, irregular masks) rendered by "
        "(a) the base model, (b) train-free regional attention, (c) the EliGen LoRA; each entity segmented by "
        "its colour and scored against its mask. Prints a table, writes JSON and a contact sheet.",
    )
    add_dataclass_arguments(shapes, BenchConfig)
    shapes.set_defaults(handler=run_bench_shapes)
    layoutsam = bench_commands.add_parser(
        "layoutsam", help="LayoutSAM-Eval: a VLM judges each box's crop (spatial, colour, texture, shape)",
        description="LayoutSAM-Eval on any FLUX.1 or Qwen-Image model (with any --lora): layouts from the "
        "LayoutSAM-eval parquet files (--data: a file or the dataset folder), rendered at the model's size with the "
        "boxes scaled (sharded with --shard I/N, resumable), each box cropped and judged by a VLM (an OpenAI-"
        "compatible server or a local Qwen2-VL / Qwen2.5-VL). Prints the table beside the published EliGen numbers, "
        "writes per-entity JSON and a contact sheet.")
    add_dataclass_arguments(layoutsam, LayoutSamConfig)
    layoutsam.set_defaults(handler=partial(run_bench_harness, "layoutsam", LayoutSamConfig))
    cocomig = bench_commands.add_parser(
        "cocomig", help="COCO-MIG: Grounding DINO finds each instance; IoU, colour, I-SR / SR / mIoU per level",
        description="COCO-MIG on any FLUX.1 or Qwen-Image model (with any --lora): layouts from MIG-Bench's "
        "mig_bench_anno.yaml (--data: the file or its folder, with mig_bench.txt for the order), rendered at the "
        "model's size with the boxes scaled (sharded, resumable), each instance detected with Grounding DINO "
        "(transformers) and colour-checked. Prints I-SR, SR and mIoU per level L2-L6 beside the published EliGen "
        "numbers, writes per-entity JSON and a contact sheet.")
    add_dataclass_arguments(cocomig, CocoMigConfig)
    cocomig.set_defaults(handler=partial(run_bench_harness, "cocomig", CocoMigConfig))

    ui = commands.add_parser(
        "ui", help="a local web app: draw entities, generate and inpaint in the browser",
        description="Start a local web app on the model: draw each entity's mask (brush, eraser, rectangle, "
        "polygon), see what the model's token grid makes of it, generate or inpaint with progress, download the "
        "PNG (its layout and parameters inside) and the layout JSON, load either to continue. Listens on "
        "127.0.0.1 unless --host says otherwise; one generation runs at a time (a queue).")
    add_dataclass_arguments(ui, UIConfig)
    ui.set_defaults(handler=run_ui)

    lora = commands.add_parser("lora", help="inspect and convert EliGen LoRA files",
                               description="Inspect and convert EliGen LoRA files (DiffSynth, kohya, diffusers keys).")
    lora_commands = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    info = lora_commands.add_parser("info", help="format, rank, alpha, adapted layers and blocks of a LoRA file")
    add_dataclass_arguments(info, LoraInfoConfig)
    info.set_defaults(handler=run_lora_info)
    convert = lora_commands.add_parser("convert", help="rewrite a LoRA file in another key format")
    add_dataclass_arguments(convert, LoraConvertConfig)
    convert.set_defaults(handler=run_lora_convert)
    return parser


def run_train(given: dict) -> int:
    from .train.config import load_train_config
    from .train.trainer import train

    result = train(load_train_config(given))
    if result.interrupted:
        print(f"interrupted at step {result.steps}; a checkpoint was saved: rerun with --resume to continue")
        return 130
    for fmt, path in result.lora_files.items():
        print(f"lora ({fmt}): {path}")
    return 0


def run_data_generate(given: dict) -> int:
    from .data.generate import generate_images

    model = given.get("model") or DataGenerateConfig.__dataclass_fields__["model"].default
    known = {f.name for f in dataclasses.fields(DataGenerateConfig)}
    declared = {k: v for k, v in model_defaults(model).items() if k in known}  # e.g. the tiny model's own steps
    result = generate_images(config_from_mapping(DataGenerateConfig, declared, given))
    print(f"images: {result.done} new, {result.skipped} already there, in {result.out}")
    return 0


def run_data_annotate(given: dict) -> int:
    from .data.annotate import annotate

    result = annotate(config_from_mapping(AnnotateConfig, given))
    print(f"annotated {result.done}, failed {result.failed}, skipped {result.skipped}; dataset: {result.jsonl}")
    if result.sheet is not None:
        print(f"contact sheet: {result.sheet}")
    if result.failed and not result.done and not result.skipped:
        print("eligen: error: no image was annotated; see the reasons above", file=sys.stderr)
        return 1
    return 0


def run_plan(given: dict) -> int:
    from .data.plan import plan_layout

    config = config_from_mapping(PlanConfig, given)
    layout = plan_layout(config)
    print(f"layout ({len(layout.entities)} entities): {config.output}")
    return 0


def run_tiny_build(given: dict) -> int:
    from .tiny.build import build

    print(f"model: {build(config_from_mapping(TinyBuildConfig, given))}")
    return 0


def run_bench_harness(name: str, config_class: type, given: dict) -> int:
    from .evals.harness import run_benchmark

    model = given.get("model") or config_class.__dataclass_fields__["model"].default
    known = {f.name for f in dataclasses.fields(config_class)}
    declared = {k: v for k, v in model_defaults(model).items() if k in known}  # e.g. the tiny model's own steps
    result = run_benchmark(name, config_from_mapping(config_class, declared, given))
    if result.table:
        print(result.table)
        print(f"report: {result.report} ({result.reported} of {result.layouts} layouts scored)")
    else:
        print(f"{name}: {result.generated} images rendered, {result.scored} scored")
    return 0


def run_bench_shapes(given: dict) -> int:
    from .tiny.bench import format_table, run_shapes_bench

    config = config_from_mapping(BenchConfig, given)
    print(format_table(run_shapes_bench(config)))
    print(f"report: {config.output_dir / 'shapesbench.json'}")
    return 0


def run_ui(given: dict) -> int:
    from .ui.server import serve

    serve(config_from_mapping(UIConfig, given))
    return 0


def run_lora_info(given: dict) -> int:
    config = config_from_mapping(LoraInfoConfig, given)
    print(format_info(lora_info(load_state_dict(config.file))))
    return 0


def run_lora_convert(given: dict) -> int:
    config = config_from_mapping(LoraConvertConfig, given)
    source, count = convert_lora_file(config)
    print(f"converted {config.input} ({source}) -> {config.output} ({config.to}, {count} tensors)")
    return 0


def run_render(command: str, given: dict) -> int:
    """`eligen generate` and `eligen inpaint`: defaults < a --from PNG's record < the flags given."""
    config_class = COMMAND_CONFIGS[command]
    stored_layout, stored_params = None, {}
    if "from_png" in given:
        if given.get("layout") is not None:
            raise ValueError("give either a layout file or --from PNG, not both")
        record = checked_record(read_metadata(given["from_png"]), given["from_png"])
        made_by = record.get("command", "generate")
        if made_by not in COMMAND_CONFIGS:
            raise ValueError(f"{given['from_png']}: its record names no eligen command ({made_by!r})")
        if made_by != command:
            raise ValueError(f"{given['from_png']} was made by `eligen {made_by}`; reproduce it with "
                             f"`eligen {made_by} --from`")
        stored_layout, stored_params = record["layout"], record["params"]
    model = given.get("model") or stored_params.get("model") or config_class().model
    known = {f.name for f in dataclasses.fields(config_class)}
    declared = {k: v for k, v in model_defaults(model).items() if k in known}  # e.g. the tiny model's own steps
    config = config_from_mapping(config_class, declared, stored_params, given)
    for result in generate(config, stored_layout):
        print(f"image: {result.path}")
        if result.overlay_path is not None:
            print(f"overlay: {result.overlay_path}")
    return 0


def quiet_libraries() -> None:
    """Keep the terminal for our own progress bars and messages: the libraries' logs, loading bars and warnings
    stay hidden (set before diffusers/transformers import; ``--verbose`` skips this)."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for library in ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if not args.pop("verbose", False):
        quiet_libraries()
    handler = args.pop("handler", None)
    args.pop("command", None)
    args.pop("lora_command", None)
    args.pop("bench_command", None)
    args.pop("data_command", None)
    args.pop("tiny_command", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (LayoutError, LoraFormatError, ValueError, FileNotFoundError) as exc:
        print(f"eligen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eligen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
