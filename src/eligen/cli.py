"""`eligen ...`: the command line. It imports the library; the library never imports it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
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
from .evals.harness import CocoMigConfig, LayoutSamConfig, OverLayBenchConfig
from .families import cards, edit_titles, titles
from .generate import EditConfig, GenerateConfig, InpaintConfig, from_source, generate
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
from .train.config import TrainConfig
from .ui.config import UIConfig

VERBOSE_HELP = "show the libraries' warnings, logs and loading bars (hidden by default)"
DESCRIPTION = f"eligen: entity-level controlled image generation (EliGen) with diffusers' {titles()}."


def _examples(command: str, extra: str = "") -> str:
    """The help's examples: one per family (its card's ``example``: a model and its EliGen LoRA), then ``extra``."""
    lines = [f"  eligen {command} {cards()[name].example}" for name in cards()]
    return "examples:\n" + "\n".join(lines) + "\n" + extra


GENERATE_EPILOG = _examples("generate layout.json -o out.png", """\
  eligen generate layout.json -o out.png --model DIR --lora eligen.safetensors --lora style.safetensors \\
      --lora-scale 1.0 --lora-scale 0.6 --overlay
  eligen generate --from out.png -o again.png          # reproduce from the PNG's metadata
  eligen generate --from out.png -o bigger.png --steps 60
""")
INPAINT_EPILOG = _examples("inpaint photo.png layout.json -o out.png", """\
  eligen inpaint photo.png layout.json -o out.png --model DIR --fusion paper --mask-blur 1.5
""")
EDIT_EPILOG = "examples:\n" + "".join(
    f"  eligen edit photo.png layout.json -o out.png {c.example}\n"
    for family in cards().values() for c in family.all_cards() if "edit" in c.features) + """\
  eligen edit photo.png layout.json -o out.png --model DIR --no-keep-outside
  eligen edit --from out.png -o again.png          # reproduce from the PNG's metadata
"""
COMMAND_CONFIGS = {"generate": GenerateConfig, "inpaint": InpaintConfig, "edit": EditConfig}


def sampling_help(config: type) -> dict[str, str]:
    """What each sampling option left unset becomes, for the help: on the command's default model, then on each
    family's models (plain generation, `data generate`, takes the diffusers pipelines' settings)."""
    from .options import SAMPLING_FIELDS, SamplingOptions, model_sampling_defaults, sampling_defaults

    if not issubclass(config, SamplingOptions):
        return {}
    baseline = "diffusers" if config is DataGenerateConfig else "reference"
    model = str(next(f.default for f in dataclasses.fields(config) if f.name == "model"))
    rows = [(model, model_sampling_defaults(model, baseline))]
    rows += [(card.title, sampling_defaults(card, {}, baseline)) for card in cards().values()]
    return {name: "runs " + ", ".join(f"{value[name]} on {title}" for title, value in rows if value[name] is not None)
            for name in SAMPLING_FIELDS}


def _command(group, name: str, config: type, handler, help: str, description: str, **kwargs):
    """One subcommand whose flags are ``config``'s fields and whose work is ``handler(given)``."""
    parser = group.add_parser(name, help=help, description=description, **kwargs)
    add_dataclass_arguments(parser, config, sampling_help(config))
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    parser.set_defaults(handler=handler)
    return parser


def _group(commands, name: str, help: str, description: str):
    """A command with subcommands (``eligen data ...``)."""
    parser = commands.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eligen", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"eligen {__version__}")
    parser.add_argument("--verbose", action="store_true", default=None, help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    _command(commands, "generate", GenerateConfig, partial(run_render, "generate"), "render a layout JSON file to a "
             "PNG", "Render a layout JSON file to a PNG. The PNG stores the layout and every parameter, so --from "
             "reproduces it.", epilog=GENERATE_EPILOG, formatter_class=raw)
    _command(commands, "inpaint", InpaintConfig, partial(run_render, "inpaint"), "repaint the entities' regions of "
             "an image in one pass (inpainting fusion)", "Repaint the regions of INPUT marked by the layout's "
             "entities, all in one denoising pass; everything else stays the input (byte for byte with paste-back). "
             "The layout's width/height default to the input's size.", epilog=INPAINT_EPILOG, formatter_class=raw)
    _command(commands, "edit", EditConfig, partial(run_render, "edit"), "edit an image region by region in one pass "
             f"with an edit model ({edit_titles()})", "Edit INPUT with an instruction-following edit model: the "
             "layout's prompt is the overall instruction, each entity a local instruction applied to its own region, "
             "all in one pass. By default everything outside the entities' regions stays the input (byte for byte "
             "with paste-back). The layout's width/height default to the input's size.", epilog=EDIT_EPILOG,
             formatter_class=raw)
    _command(commands, "train", TrainConfig, run_train, "train an EliGen LoRA on entity-annotated data",
             "Train an EliGen LoRA (the paper's recipe: rank-64 LoRA on every block linear, AdamW, rectified flow) "
             "under accelerate. Any field can come from CONFIG.yaml; flags override it. For several GPUs or "
             "DeepSpeed ZeRO-2: accelerate launch --config_file configs/accelerate_deepspeed_zero2.yaml -m eligen.cli "
             "train CONFIG.yaml")
    _add_data_commands(commands)
    _command(commands, "plan", PlanConfig, run_plan, "plan a layout from text with a grounding MLLM", "Turn a "
             "description into a global prompt and entities with boxes, written as a layout file that `eligen "
             "generate` renders.")
    tiny = _group(commands, "tiny", "the embedded default model", "The embedded default model.")
    _command(tiny, "build", TinyBuildConfig, run_tiny_build, "train the tiny shapes-world model from scratch (VAE, "
             "base, EliGen LoRA)", "Train the tiny default model from scratch on the shapes world: a small VAE, a "
             "text-to-image base on global captions, then an EliGen LoRA with `eligen train` on entity boxes. "
             "Deterministic given --seed; about 99 minutes on 2 CPU cores with the defaults (measured for the "
             "shipped model).")
    _add_bench_commands(commands)
    _command(commands, "ui", UIConfig, run_ui, "a local web app: draw entities, generate and inpaint in the browser",
             "Start a local web app on the model: draw each entity's mask (brush, eraser, rectangle, polygon), see "
             "what the model's token grid makes of it, generate or inpaint with progress, download the PNG (its "
             "layout and parameters inside) and the layout JSON, load either to continue. Listens on 127.0.0.1 "
             "unless --host says otherwise; one generation runs at a time (a queue).")
    lora = _group(commands, "lora", "inspect and convert EliGen LoRA files",
                  "Inspect and convert EliGen LoRA files (DiffSynth, kohya, diffusers keys).")
    _command(lora, "info", LoraInfoConfig, run_lora_info, "format, rank, alpha, adapted layers and blocks of a LoRA "
             "file", "Print the format, family, rank, alpha, adapted layers and blocks of a LoRA file.")
    _command(lora, "convert", LoraConvertConfig, run_lora_convert, "rewrite a LoRA file in another key format",
             "Rewrite a LoRA file in another key format (written atomically).")
    return parser


def _add_data_commands(commands) -> None:
    data = _group(commands, "data", "build EliGen training data: generate images, annotate them with a VLM",
                  f"Build EliGen training data the paper's way: images from captions with any {titles()} model, "
                  "then a grounding VLM writes captions and entity boxes.")
    _command(data, "generate", DataGenerateConfig, run_data_generate, "images from captions (txt or jsonl), "
             "resumable and shardable (--shard i/n)", f"Render captions with any diffusers {titles()} model into "
             "OUT/images; finished images are skipped, writes are atomic, --shard i/n (or accelerate/torchrun's "
             "RANK/WORLD_SIZE) splits the work.")
    _command(data, "annotate", AnnotateConfig, run_data_annotate, "caption + entity boxes for every image with a "
             "grounding VLM -> the trainer's JSONL", "Ask a grounding VLM (an OpenAI-compatible server such as vLLM "
             "or SGLang, or a local Qwen2-VL / Qwen2.5-VL through transformers) for a caption and entities with "
             "boxes for each image of FOLDER/images; malformed answers are retried, failures recorded, finished "
             "images skipped; writes FOLDER/annotations.jsonl and a contact sheet.")


def _add_bench_commands(commands) -> None:
    bench = _group(commands, "bench", "benchmarks of entity control", "Benchmarks of entity control.")
    _command(bench, "shapes", BenchConfig, run_bench_shapes, "ShapesBench: mask IoU, colour accuracy and recall on "
             "held-out shapes-world layouts", "ShapesBench: held-out layouts with 1-4 entities (box, ellipse, "
             "irregular masks) rendered by (a) the base model, (b) train-free regional attention, (c) the EliGen "
             "LoRA; each entity segmented by its colour and scored against its mask. Prints a table, writes JSON "
             "and a contact sheet.")
    raw = argparse.RawDescriptionHelpFormatter
    _command(bench, "layoutsam", LayoutSamConfig, partial(run_bench_harness, "layoutsam", LayoutSamConfig),
             "LayoutSAM-Eval: a VLM judges each box's crop (spatial, colour, texture, shape)",
             f"LayoutSAM-Eval on any {titles()} model (with any --lora), scored as CreatiLayout's "
             "score_layoutsam_benchmark.py does: layouts from the LayoutSAM-eval parquet files (--data: a file or the "
             "dataset folder; --indices FILE for a subset), rendered at the model's size with EliGen's reference "
             "settings (sharded with --shard I/N, resumable), each box cropped and judged with the protocol's "
             "questions and decoding by a VLM (MiniCPM-V 2.6 served by vLLM matches the protocol). Prints the table "
             "beside the published numbers with their sources and what keeps the run from being comparable.",
             epilog=_bench_epilog("layoutsam", "--data ./LayoutSAM-eval -o runs/layoutsam --indices subset.json "
                                  "--vlm openai --base-url http://127.0.0.1:8000/v1 --vlm-model openbmb/MiniCPM-V-2_6",
                                  "vllm serve openbmb/MiniCPM-V-2_6 --trust-remote-code --port 8000"),
             formatter_class=raw)
    _command(bench, "cocomig", CocoMigConfig, partial(run_bench_harness, "cocomig", CocoMigConfig),
             "COCO-MIG: Grounding DINO finds each instance, SAM segments it; I-SR / SR / mIoU per level",
             f"COCO-MIG on any {titles()} model (with any --lora), scored as MIG-Bench's eval_mig.py does: layouts "
             "from mig_bench_anno.yaml (--data: the file or its folder, with mig_bench.txt for the order), rendered "
             "with EliGen's reference settings (sharded, resumable), every image resized to 512x512 as OpenCV does, "
             "each instance detected with Grounding DINO, its ground-truth box segmented with SAM (ViT-H) and the "
             "mask's colour checked with the script's HSV table. Prints I-SR, SR and mIoU per level L2-L6 beside the "
             "published numbers; --seeds N repeats the run and prints the spread.",
             epilog=_bench_epilog("cocomig", "--data ./MIGC/bench_file -o runs/cocomig", ""), formatter_class=raw)
    _command(bench, "overlaybench", OverLayBenchConfig, partial(run_bench_harness, "overlaybench", OverLayBenchConfig),
             "OverLayBench: overlapping entities; a VLM predicts boxes and checks entities and relations",
             f"OverLayBench on any {titles()} model (with any --lora), scored as its toolkit's OverLayBenchMeter does: "
             "layouts from its evaluation set (--data: the dataset folder of parquet files; --split simple, medium, "
             "hard or all), rendered with EliGen's reference settings, then Qwen2.5-VL (served or local) asked for "
             "every instance's box (mIoU, overlap mIoU), whether each entity and each relation is right (SR_E, SR_R).",
             epilog=_bench_epilog("overlaybench", "--data ./OverLayBench_Eval -o runs/overlaybench --vlm openai "
                                  "--base-url http://127.0.0.1:8000/v1 --vlm-model Qwen/Qwen2.5-VL-32B-Instruct",
                                  "vllm serve Qwen/Qwen2.5-VL-32B-Instruct --port 8000"),
             formatter_class=raw)


def _bench_epilog(name: str, arguments: str, server: str) -> str:
    """The one command per family that reproduces the published setting (the model and its EliGen LoRA from the
    family's card; every other setting is the protocol's and EliGen's reference by default)."""
    lines = [f"  {server}"] if server else []
    lines += [f"  eligen bench {name} {arguments} {cards()[family].example.replace(' --overlay', '')}"
              for family in cards()]
    heading = "reproduce the published setting on a GPU (one line per model family; the published numbers: the first)"
    return heading + ":\n" + "\n".join(lines) + "\n"


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

    config = config_from_mapping(DataGenerateConfig, given)
    result = generate_images(config)
    failed = f", {len(result.failed)} failed" if result.failed else ""
    print(f"images: {result.done} new, {result.skipped} already there{failed}, in {result.out}")
    return _failures(result.failed, config.retries)


def _failures(failed: list[tuple[str, str]], retries: int) -> int:
    """Name each item that failed after its retries (--engine ray); 1 when any did."""
    from .scale.ray_engine import report_failures

    report_failures(failed, retries)
    if failed:
        print(f"eligen: error: {len(failed)} item(s) failed after {retries + 1} attempt(s) (named above); the others "
              "are done: rerun to retry the failed ones", file=sys.stderr)
    return 1 if failed else 0


def run_data_annotate(given: dict) -> int:
    from .data.annotate import annotate

    config = config_from_mapping(AnnotateConfig, given)
    result = annotate(config)
    left_out = f", {result.left_out} annotation file(s) left out (named above)" if result.left_out else ""
    print(f"annotated {result.done}, failed {result.failed}, skipped {result.skipped}{left_out}; dataset: "
          f"{result.jsonl}")
    if result.sheet is not None:
        print(f"contact sheet: {result.sheet}")
    if result.failed and not result.done and not result.skipped:
        print("eligen: error: no image was annotated; see the reasons above", file=sys.stderr)
        return 1
    return _failures(result.errors, config.retries)


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

    result = run_benchmark(name, config_from_mapping(config_class, given))
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
    from .ui.config import require_ui_extra

    config = config_from_mapping(UIConfig, given)
    require_ui_extra()
    from .ui.server import serve

    serve(config)
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
    """`eligen generate`, `eligen inpaint` and `eligen edit`: defaults < a --from PNG's record < the flags given."""
    config_class = COMMAND_CONFIGS[command]
    stored_layout: dict | None = None
    stored_params: dict = {}
    if "from_png" in given:
        stored_layout, stored_params, given = from_source(command, given["from_png"], given)
    config = config_from_mapping(config_class, stored_params, given)
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
    for library in ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "ray"):
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    logging.getLogger("ray").setLevel(logging.WARNING)  # --engine ray: Ray Data's per-dataset INFO lines


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
    except BrokenPipeError:  # the reader went away (`eligen lora info F | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
