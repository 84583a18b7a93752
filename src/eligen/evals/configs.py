"""The options of `eligen bench layoutsam`, `cocomig` and `overlaybench` (each field one flag; docs/design.md
section 13). What they share (the data, the model, the sampling options, seeds, shards) is
:class:`~eligen.evals.generation.BenchRunConfig`; here are the judges'."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import option
from ..data.vlm import VLM_KINDS
from . import cocomig, judges
from .generation import BenchRunConfig
from .layouts import OVERLAYBENCH_SPLITS
from .segment import DEFAULT_SAM

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"


@dataclass
class JudgeOptions:
    """A VLM judge: where it runs and how it decodes."""

    vlm: str = option("openai", "the judge's backend: an OpenAI-compatible server (vLLM, SGLang), or a local "
                      "Qwen2-VL / Qwen2.5-VL through transformers", choices=VLM_KINDS)
    vlm_model: str | None = option(None, "the judge: the model name the server serves (openai), or a local path / "
                                   "hub id (transformers)")
    base_url: str | None = option(None, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the API key")
    timeout: float = option(120.0, "seconds to wait for one answer (openai)")
    concurrency: int = option(4, "layouts judged in parallel (openai; transformers always uses 1)")
    judge_decoding: str = option("protocol", "how the judge draws its answers: protocol (the benchmark's own "
                                 "decoding) or greedy (not the protocol's: the report says the run is not "
                                 "comparable)", choices=judges.JUDGE_DECODINGS)

    def check_judge(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.judge_decoding not in judges.JUDGE_DECODINGS:
            raise ValueError(f"--judge-decoding must be one of {judges.JUDGE_DECODINGS}, got {self.judge_decoding!r}")

    def decoding(self, protocol: judges.Decoding) -> judges.Decoding:
        if self.judge_decoding == "greedy":
            return dataclasses.replace(judges.GREEDY, max_tokens=protocol.max_tokens)
        return protocol


@dataclass
class LayoutSamConfig(BenchRunConfig, JudgeOptions):
    """`eligen bench layoutsam`: the run, and the VLM that judges each box (the benchmark's: MiniCPM-V 2.6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_judge()


@dataclass
class OverLayBenchConfig(BenchRunConfig, JudgeOptions):
    """`eligen bench overlaybench`: the run, the split(s), and the VLM that judges each image (the benchmark's:
    Qwen2.5-VL-32B-Instruct)."""

    split: str = option("all", "which split: simple, medium, hard, or all (each into its own folder)",
                        choices=(*OVERLAYBENCH_SPLITS, "all"))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_judge()

    def splits(self) -> tuple[str, ...]:
        return OVERLAYBENCH_SPLITS if self.split == "all" else (self.split,)


@dataclass
class CocoMigConfig(BenchRunConfig):
    """`eligen bench cocomig`: the run, the detector that finds each instance and the SAM that segments it."""

    detector: str = option(DEFAULT_DETECTOR, "Grounding DINO checkpoint (local folder or hub id) loaded with "
                           "transformers")
    sam: str = option(DEFAULT_SAM, "SAM checkpoint (local folder or hub id) loaded with transformers; the benchmark's "
                      "is ViT-H, any other makes the run not comparable")
    box_threshold: float = option(0.25, "detections kept above this box score (the benchmark's: 0.25)")
    text_threshold: float = option(0.25, "phrase tokens kept above this score (the benchmark's: 0.25)")
    iou_threshold: float = option(cocomig.IOU_THRESHOLD, "IoU at which an instance counts as detected (the "
                                  "benchmark's: 0.5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("box_threshold", "text_threshold", "iou_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")

    def changed_thresholds(self) -> list[str]:
        """The thresholds set away from the benchmark's (each makes the run non-comparable)."""
        protocol = {"box_threshold": 0.25, "text_threshold": 0.25, "iou_threshold": cocomig.IOU_THRESHOLD}
        return [f"--{k.replace('_', '-')} {getattr(self, k)}" for k, v in protocol.items() if getattr(self, k) != v]

