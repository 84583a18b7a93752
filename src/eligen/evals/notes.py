"""What a benchmark report says about comparability (docs/design.md section 13): the protocol deviations that remain
in every run, and the settings of this run that make its numbers not comparable with the published ones."""

from __future__ import annotations

from typing import Any

from .layouts import OVERLAYBENCH_SPLITS
from .overlaybench import JUDGE_MODEL as OVERLAYBENCH_JUDGE
from .segment import DEFAULT_SAM

DEVIATIONS = {
    "cocomig": (
        "Grounding DINO runs through transformers (IDEA-Research/grounding-dino-tiny, the converted Swin-T OGC "
        "weights) and SAM through transformers' SamModel, not the original packages: same inputs and thresholds, "
        "float rounding may differ",
        "images smaller than 512 are enlarged like OpenCV up to one level on under 1 % of the pixels; the script "
        "resizes only images whose height is not 512, eligen every image that is not 512x512",
        "the published runs' generation settings and seed are not public",
    ),
    "layoutsam": (
        "the judge is a served model (vLLM): MiniCPM-V 2.6 there builds its prompt and slices the image as the "
        "server does, not through the checkpoint's own chat()",
        "every judge request carries seed 42; the protocol's chat() samples unseeded",
        "the published EliGen figure's 1k subset is not public: without --indices this is not that subset",
    ),
    "overlaybench": (
        "the toolkit's CLIP scores and FID are not computed",
        "answers are kept by layout; the toolkit keys them by the image id padded to 8 characters",
        "prompts at another size than 1024 or 512 have their boxes scaled to that size (the toolkit knows only "
        "those two)",
        "the published figures' split and seeds are not stated where they are quoted",
    ),
}


def generation_notes(record: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    """Generation settings away from EliGen's reference ones for the model's family (``reference``: the resolved
    reference settings, or None when the model's family could not be read)."""
    if reference is None:
        return []
    changed = [f"{k} {record.get(k)!r} (reference {v!r})" for k, v in reference.items() if record.get(k) != v]
    return [f"generation settings differ from EliGen's reference: {', '.join(changed)}"] if changed else []


def judge_notes(config: Any, protocol_model: str, local_ok: bool = False) -> list[str]:
    """A VLM judge other than the protocol's, or decoded otherwise."""
    notes = []
    if protocol_model.lower() not in (config.vlm_model or "").lower():
        notes.append(f"the judge is {config.vlm_model!r}, not the protocol's {protocol_model}")
    if config.vlm == "transformers" and not local_ok:
        notes.append("a local transformers judge: only a served " + protocol_model + " matches the protocol")
    if config.judge_decoding != "protocol":
        notes.append(f"--judge-decoding {config.judge_decoding}: not the protocol's decoding")
    return notes


def subset_notes(config: Any, layouts: int, total: int) -> list[str]:
    if layouts < total:
        return [f"{layouts} of the benchmark's {total} layouts (--limit / --indices)"]
    return []


def cocomig_notes(config: Any, judge: Any) -> list[str]:
    notes = [f"thresholds away from the benchmark's: {', '.join(config.changed_thresholds())}"] \
        if config.changed_thresholds() else []
    if (judge is not None and not judge.comparable_segmenter) or (judge is None and config.sam != DEFAULT_SAM):
        notes.append(f"SAM {config.sam!r} is not ViT-H ({DEFAULT_SAM}), the benchmark's segmenter")
    return notes


def layoutsam_notes(config: Any, judge: Any) -> list[str]:
    notes = judge_notes(config, "MiniCPM-V-2_6")
    if config.indices is None:
        notes.append("the published figures are on a 1k subset; give it with --indices FILE")
    return notes


def overlaybench_notes(config: Any, judge: Any) -> list[str]:
    notes = judge_notes(config, OVERLAYBENCH_JUDGE.split("/")[-1], local_ok=True)
    if config.splits() != OVERLAYBENCH_SPLITS:
        notes.append(f"split {config.split} only")
    return notes
