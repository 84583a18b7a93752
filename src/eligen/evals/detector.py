"""Grounding DINO through transformers, as COCO-MIG's open-vocabulary detector.

``GroundingDinoDetector(model)`` loads any Grounding DINO checkpoint with ``from_pretrained`` (a local folder or a
hub id such as ``IDEA-Research/grounding-dino-tiny``, the Swin-T model the benchmark uses). ``detect(image,
label)`` asks for one noun phrase and returns ``[(box, score)]`` in pixels of ``image``: detections above
``box_threshold`` whose phrase tokens pass ``text_threshold`` (0.25 and 0.25, the benchmark's), then greedy NMS at
IoU 0.8. Boxes are not clipped to the image (the benchmark's detector does not clip them either, and a box reaching
past the border changes its IoU).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from .boxes import Box, nms

NMS_IOU = 0.8


class GroundingDinoDetector:
    def __init__(self, model: str | Path, device: str | None = None, box_threshold: float = 0.25,
                 text_threshold: float = 0.25) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0 <= value <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        from ..models import loading

        with loading("the Grounding DINO detector", model):
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(model).to(self.device).eval()
        if getattr(self.model.config, "model_type", None) != "grounding-dino":
            raise ValueError(f"{model} is a {self.model.config.model_type!r} model, not Grounding DINO")
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    @staticmethod
    def query(label: str) -> str:
        """Grounding DINO's text form: lower case, ending in a period."""
        return label.strip().lower().rstrip(".") + "."

    def detect(self, image, label: str) -> list[tuple[Box, float]]:
        import torch

        image = image.convert("RGB")
        inputs = self.processor(images=image, text=self.query(label), return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = result["scores"].float().cpu().numpy().reshape(-1)
        keep = nms(boxes, scores, NMS_IOU)
        return [(cast(Box, tuple(float(v) for v in boxes[i])), float(scores[i])) for i in keep]
