"""A Qwen2-VL processor for Qwen-Image-Edit that loads without torchvision (docs/design.md section 21).

diffusers' ``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` take a ``Qwen2VLProcessor`` (image processor,
tokenizer, video processor). In transformers 5.x its video processor needs torchvision: without it the processor can
be neither built nor loaded, although editing never reads a video. :class:`NoVideoQwen2VLProcessor` is that processor
with the video slot held by a stand-in that refuses videos; the tokenizer and the image processor are the real ones,
and everything the pipelines call (``__call__`` on text and images) is ``Qwen2VLProcessor``'s own code.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class NoVideoProcessor:
    """The stand-in in the video slot: editing never reaches it, and a video is refused by name."""

    merge_size = 2
    temporal_patch_size = 2

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("this Qwen2-VL processor has no video processor (it needs torchvision); Qwen-Image-Edit "
                         "reads text and images only")


class NoVideoQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with an image processor and a tokenizer and no video processor: builds, saves and loads
    without torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor's own __init__ would insist on the video processor, which cannot exist here; the attributes
        # it sets are set here the same way.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = NoVideoProcessor()
        for name, default in (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>")):
            token = getattr(tokenizer, name, None) or default
            setattr(self, name, token)
            token_id = getattr(tokenizer, f"{name}_id", None) or tokenizer.convert_tokens_to_ids(token)
            setattr(self, f"{name}_id", token_id)
