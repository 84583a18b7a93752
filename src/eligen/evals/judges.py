"""The VLM judges of LayoutSAM-Eval and OverLayBench, with the protocols' decoding (docs/design.md section 13).

A judge takes chat ``messages`` (``[{"role", "content": [text or PIL image, ...]}]``, in the order the protocol
writes them) and returns the answer text. Two backends:

- :class:`ServedJudge`: any OpenAI-compatible server (vLLM, SGLang). The decoding is sent with every request.
- :class:`LocalJudge`: a Qwen2-VL / Qwen2.5-VL loaded with transformers (the data pipeline's local backend).

:class:`Decoding` says how the answer is drawn: ``MINICPM_CHAT`` is what LayoutSAM-Eval's judge does (MiniCPM-V
2.6's ``chat()`` samples by default: temperature 0.7, top-p 0.8, top-k 100, repetition penalty 1.05, up to 2048 new
tokens; the seed 42 the protocol passes is not among the options ``chat()`` forwards, so its answers are not seeded;
here each request carries seed 42, so a rerun asks the same); ``MODEL_DEFAULTS`` is what OverLayBench's meter does
(the judge checkpoint's own generation config, up to 1024 new tokens); ``GREEDY`` is an option, and makes a run
non-comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..data.vlm import OpenAIBackend, image_data_url

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Decoding:
    name: str
    sample: bool | None  # True: sample; False: greedy; None: the checkpoint's own generation config
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def request_fields(self) -> dict[str, Any]:
        """The fields of an OpenAI-compatible chat request (vLLM reads ``top_k`` and ``repetition_penalty`` too).
        Without sampling fields the server applies the model's generation config (vLLM's default)."""
        fields: dict[str, Any] = {"max_tokens": self.max_tokens}
        if self.sample is False:
            fields["temperature"] = 0.0
        elif self.sample:
            fields.update({k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                             ("top_k", self.top_k), ("repetition_penalty", self.repetition_penalty),
                                             ("seed", self.seed)) if v is not None})
        return fields

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of transformers' ``generate``."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_tokens}
        if self.sample is False:
            kwargs["do_sample"] = False
        elif self.sample:
            kwargs.update({"do_sample": True, **{k: v for k, v in (
                ("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                ("repetition_penalty", self.repetition_penalty)) if v is not None}})
        return kwargs


MINICPM_CHAT = Decoding("MiniCPM-V chat() sampling", sample=True, max_tokens=2048, temperature=0.7, top_p=0.8,
                        top_k=100, repetition_penalty=1.05, seed=42)
MODEL_DEFAULTS = Decoding("the judge model's own generation config", sample=None, max_tokens=1024)
GREEDY = Decoding("greedy", sample=False, max_tokens=1024)
JUDGE_DECODINGS = ("protocol", "greedy")


def user_message(*content: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(content)}


def _openai_content(item: Any) -> dict[str, Any]:
    if isinstance(item, Image.Image):
        return {"type": "image_url", "image_url": {"url": image_data_url(item)}}
    return {"type": "text", "text": str(item)}


class ServedJudge(OpenAIBackend):
    """A judge on an OpenAI-compatible server; ``ask(prompt, image)`` is one user message, image first."""

    def __init__(self, base_url: str, model: str, decoding: Decoding, api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        super().__init__(base_url, model, api_key=api_key, timeout=timeout, max_tokens=decoding.max_tokens)
        self.decoding = decoding

    def request(self, messages: Messages) -> dict[str, Any]:
        """The JSON body of one chat request."""
        return {"model": self.model, **self.decoding.request_fields(),
                "messages": [{"role": m["role"], "content": [_openai_content(c) for c in m["content"]]}
                             for m in messages]}

    def chat(self, messages: Messages) -> str:
        return self._content(self._post(self.request(messages)))

    def ask(self, prompt: str, image: Image.Image | None = None) -> str:
        return self.chat([user_message(*([image] if image is not None else []), prompt)])


def load_local_judge(model: str, decoding: Decoding):
    """A local Qwen2-VL / Qwen2.5-VL judge (transformers); refused by name for any other model."""
    import torch

    from ..data.transformers_backend import TransformersBackend, _PilProcessor

    class LocalJudge(TransformersBackend):
        def __init__(self) -> None:
            super().__init__(model, max_new_tokens=decoding.max_tokens)
            self.decoding = decoding

        def _encode(self, messages: Messages) -> dict[str, torch.Tensor]:
            images = [c for m in messages for c in m["content"] if isinstance(c, Image.Image)]
            if len(images) > 1:
                raise ValueError("the local judge takes one image per question")
            chat = [{"role": m["role"], "content": [{"type": "image"} if isinstance(c, Image.Image) else
                                                    {"type": "text", "text": str(c)} for c in m["content"]]}
                    for m in messages]
            image = images[0].convert("RGB") if images else None
            if isinstance(self.processor, _PilProcessor):
                inputs = self.processor(self.processor.apply_chat_template(chat), image)
            else:
                text = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                inputs = dict(self.processor(text=[text], images=[image] if image else None, return_tensors="pt"))
            return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

        def chat(self, messages: Messages) -> str:
            with torch.no_grad():
                inputs = self._encode(messages)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                if self.decoding.seed is not None:
                    torch.manual_seed(self.decoding.seed)
                output = self.model.generate(**inputs, **self.decoding.generate_kwargs(),
                                             pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            return text.strip()

        def ask(self, prompt: str, image: Any = None) -> str:
            return self.chat([user_message(*([image] if image is not None else []), prompt)])

    return LocalJudge()


def make_judge(kind: str, model: str | None, base_url: str | None, api_key_env: str, timeout: float,
               decoding: Decoding):
    """The judge a benchmark command names; a missing judge name or endpoint is one line naming the flag."""
    import os

    if not model:
        raise ValueError(f"--vlm-model is required with --vlm {kind}: the judge ("
                         + ("the model name the server serves)" if kind == "openai" else "a local path or hub id)"))
    if kind == "transformers":
        return load_local_judge(model, decoding)
    if kind != "openai":
        raise ValueError(f"unknown judge backend {kind!r}; choose openai or transformers")
    if not base_url:
        raise ValueError("--base-url is required with --vlm openai (e.g. http://127.0.0.1:8000/v1 of a vLLM server)")
    return ServedJudge(base_url, model, decoding, api_key=os.environ.get(api_key_env) or None, timeout=timeout)
