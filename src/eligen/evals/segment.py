"""SAM through transformers, as COCO-MIG's segmenter (docs/design.md section 13).

The benchmark segments each instance with Segment Anything prompted by the instance's *ground-truth* box, asks for
three masks and keeps the one SAM scores best. :class:`SamSegmenter` does that with transformers' ``SamModel`` and
``SamProcessor`` (resize to the longest side, normalise, pad; the box scaled alike; the low-resolution masks
upsampled back and thresholded at 0), which is the original predictor's pipeline. The default checkpoint is ViT-H
(``facebook/sam-vit-huge``), the benchmark's; any other is allowed and makes the run non-comparable
(:meth:`SamSegmenter.is_vit_h`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_SAM = "facebook/sam-vit-huge"
VIT_H = {"hidden_size": 1280, "num_hidden_layers": 32}  # SAM ViT-H's image encoder


class Segmenter(Protocol):
    def segment(self, image, box: Sequence[float]) -> np.ndarray:
        """The best of SAM's masks for ``box`` (pixels of ``image``): ``(H, W)`` bool at the image's size."""
        ...


class SamSegmenter:
    def __init__(self, model: str | Path, device: str | None = None) -> None:
        import torch
        from transformers import SamModel, SamProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = SamProcessor.from_pretrained(model)
        self.model = SamModel.from_pretrained(model).to(self.device).eval()  # type: ignore[arg-type]
        if getattr(self.model.config, "model_type", None) != "sam":
            raise ValueError(f"{model} is a {self.model.config.model_type!r} model, not SAM (e.g. {DEFAULT_SAM})")

    @property
    def is_vit_h(self) -> bool:
        """Whether the image encoder has ViT-H's shape (the benchmark's SAM)."""
        vision = self.model.config.vision_config
        return all(getattr(vision, k, None) == v for k, v in VIT_H.items())

    def segment(self, image, box: Sequence[float]) -> np.ndarray:
        import torch

        image = image.convert("RGB")
        inputs = self.processor(images=image, input_boxes=[[[float(v) for v in box]]], return_tensors="pt")
        inputs["input_boxes"] = inputs["input_boxes"].float()
        with torch.no_grad():
            outputs = self.model(**{k: v.to(self.device) for k, v in inputs.items()}, multimask_output=True)
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])[0][0]  # (3, H, W) bool
        best = int(torch.argmax(outputs.iou_scores[0, 0].float()).item())
        return masks[best].numpy().astype(bool)
