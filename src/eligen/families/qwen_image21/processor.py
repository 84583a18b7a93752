"""A text-and-image Qwen3-VL processor for Qwen-Image 2.1 that loads without torchvision (docs/design.md section 20).

diffusers' ``QwenImage21Pipeline`` takes a ``Qwen3VLProcessor`` (image processor, tokenizer, video processor). In
transformers 5.x its video processor needs torchvision: without it the processor can be neither built nor loaded,
although text-to-image never reads a video. :class:`TextOnlyQwen3VLProcessor` is that processor with the video slot
held by a stand-in that refuses videos: the tokenizer (carrying the chat template) and the image processor are the
real ones, and everything the pipeline calls (``apply_chat_template``, ``__call__`` on text, ``tokenizer``) is
``Qwen3VLProcessor``'s own code. A pipeline saved with it names this module in its ``model_index.json``; the module is
imported with the EliGen pipeline, so such a directory loads in any process that loads eligen's pipeline.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


class NoVideoProcessor:
    """The stand-in in the video slot: text-to-image never reaches it, and a video is refused by name."""

    merge_size = 2
    temporal_patch_size = 2

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("this Qwen3-VL processor has no video processor (it needs torchvision); "
                         "Qwen-Image 2.1 reads text and images only")


class TextOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with an image processor and a tokenizer (its chat template included) and no video
    processor: builds, saves and loads without torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin checks and sets the two sub-processors; Qwen3VLProcessor's own __init__ would insist on the
        # third (the video processor, which cannot exist here), so the attributes it sets are set here the same way.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_processor = NoVideoProcessor()
        for name, default in (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
                              ("vision_start_token", "<|vision_start|>"), ("vision_end_token", "<|vision_end|>")):
            token = getattr(tokenizer, name, None) or default
            setattr(self, name, token)
            token_id = getattr(tokenizer, f"{name}_id", None) or tokenizer.convert_tokens_to_ids(token)
            setattr(self, f"{name}_id", token_id)
