"""A grounding VLM run locally with transformers: Qwen2-VL or Qwen2.5-VL (a directory or a Hub id).

:class:`TransformersBackend` follows the ``VLMBackend`` protocol of :mod:`eligen.data.vlm` (``convention`` plus
``ask(prompt, image=None) -> str``). Answers keep Qwen2-VL's grounding tokens (``<|object_ref_start|>``,
``<|box_start|>`` ...) so :func:`eligen.data.parse.parse_annotation` can read them; only end and padding tokens are
removed.

Without torchvision, transformers 5.x cannot build ``Qwen2VLProcessor`` (its ``video_processor`` needs
torchvision, even when no video is ever passed). The backend then loads the tokenizer and the PIL image processor
(``Qwen2VLImageProcessorPil``) separately and does the processor's work itself: render the chat template, expand
``<|image_pad|>`` to one token per merged patch and mark image tokens in ``mm_token_type_ids`` for M-RoPE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
CONVENTIONS = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen25"}
STRIP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end/pad tokens removed from answers; grounding tokens stay
IMAGE_TOKEN = "<|image_pad|>"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_chat_template(model: str | Path) -> str | None:
    """The chat template of a local checkpoint directory (``chat_template.jinja`` or ``chat_template.json``)."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


class _PilProcessor:
    """The part of ``Qwen2VLProcessor`` the backend needs, from a tokenizer and the PIL image processor."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or tokenizer.chat_template
        if self.chat_template is None:
            raise ValueError("the checkpoint has no chat template (tokenizer or chat_template.jinja/.json)")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text: str, image: Any = None) -> dict[str, torch.Tensor]:
        inputs: dict[str, torch.Tensor] = {}
        if image is not None:
            vision = self.image_processor(images=[image], return_tensors="pt")
            inputs["pixel_values"] = vision["pixel_values"]
            inputs["image_grid_thw"] = vision["image_grid_thw"]
            merge = self.image_processor.merge_size ** 2
            count = int(vision["image_grid_thw"][0].prod()) // merge
            if text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"the chat template must place exactly one {IMAGE_TOKEN} for one image")
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * count)
        encoded = self.tokenizer([text], return_tensors="pt")
        inputs["input_ids"] = encoded["input_ids"]
        inputs["attention_mask"] = encoded["attention_mask"]
        inputs["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).to(torch.int32)
        return inputs


class TransformersBackend:
    """Qwen2-VL / Qwen2.5-VL loaded with ``from_pretrained``; ``ask`` generates greedily and returns the answer.

    ``model`` is a checkpoint directory or Hub id, ``device`` defaults to CUDA when available (``"auto"`` spreads
    the model over all GPUs), ``dtype`` to the checkpoint's own (``"auto"``). ``convention`` (``"qwen2"``,
    ``"qwen25"`` or ``"auto"``: from the model type) tells :func:`eligen.data.parse.parse_annotation` how to read
    the answers. ``last_num_tokens`` is the number of tokens the latest ``ask`` generated.
    """

    def __init__(self, model: str | Path, device: str | None = None, dtype: torch.dtype | None = None,
                 max_new_tokens: int = 512, convention: str = "auto") -> None:
        import transformers

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        from ..models import loading

        with loading("the VLM", model):
            config = AutoConfig.from_pretrained(model)
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_CLASSES:
            raise ValueError(f"unsupported model type {model_type!r} for {model}; supported: "
                             f"{', '.join(sorted(MODEL_CLASSES))} (Qwen2-VL, Qwen2.5-VL)")
        if convention == "auto":
            convention = CONVENTIONS[model_type]
        elif convention not in ("qwen2", "qwen25"):
            raise ValueError(f"unknown convention {convention!r}; use auto, qwen2 or qwen25")
        self.convention = convention
        self.model_type = model_type
        self.max_new_tokens = max_new_tokens
        device = device or _default_device()
        model_class = getattr(transformers, MODEL_CLASSES[model_type])
        with loading("the VLM", model):
            self.processor = self._load_processor(model)
            # device "auto" spreads a large checkpoint (e.g. Qwen2.5-VL-72B) over the visible GPUs with accelerate.
            self.model = model_class.from_pretrained(model, dtype=dtype if dtype is not None else "auto",
                                                     device_map=device)
        self.tokenizer = self.processor.tokenizer
        self.device = self.model.device
        self.model.eval()
        self.last_num_tokens = 0  # tokens generated by the latest ``ask`` (end token included)
        self._strip = [t for t in STRIP_TOKENS if t in self.tokenizer.get_vocab()]
        for token in (self.tokenizer.eos_token, self.tokenizer.pad_token):
            if token and token not in self._strip:
                self._strip.append(token)

    @staticmethod
    def _load_processor(model: str | Path):
        try:
            processor = AutoProcessor.from_pretrained(model)
        except ImportError:  # transformers 5.x: Qwen2VLVideoProcessor (hence Qwen2VLProcessor) needs torchvision
            processor = None
        if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
        tokenizer = AutoTokenizer.from_pretrained(model)
        image_processor = AutoImageProcessor.from_pretrained(model)
        return _PilProcessor(tokenizer, image_processor, _read_chat_template(model))

    def _inputs(self, prompt: str, image: Any) -> dict[str, torch.Tensor]:
        content: list[dict] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if isinstance(self.processor, _PilProcessor):
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(text, image)
        else:  # the full Qwen2VLProcessor / Qwen2_5_VLProcessor (transformers with torchvision)
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            images = [image] if image is not None else None
            inputs = dict(self.processor(text=[text], images=images, return_tensors="pt"))
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def ask(self, prompt: str, image: Any = None) -> str:
        """The model's answer to ``prompt`` about ``image`` (a PIL image, or ``None`` for text only)."""
        if image is not None:
            image = image.convert("RGB")
        with torch.no_grad():
            inputs = self._inputs(prompt, image)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        self.last_num_tokens = int(new_tokens.numel())
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for token in self._strip:
            text = text.replace(token, "")
        return text.strip()

    def __repr__(self) -> str:
        return (f"TransformersBackend(model_type={self.model_type!r}, device={str(self.device)!r}, "
                f"max_new_tokens={self.max_new_tokens}, convention={self.convention!r})")
