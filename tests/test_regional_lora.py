"""Regional (per-entity) LoRA (docs/design.md section 22): an entity's LoRA update reaches its own text tokens and the
image tokens its mask covers, in every adapted layer, and no other token.

The reference here is written from that rule alone: a plain pipeline of the same weights with a forward hook on each
adapted linear layer adding ``x A^T B^T`` times the token weights this file builds from the entity boxes and the
stock encoders' segment lengths, with its own table of which layer acts on which stream.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eligen import (
    EliGenFlux2Pipeline,
    EliGenFluxKontextPipeline,
    EliGenKrea2Pipeline,
    EliGenPipeline,
    EliGenQwenImage21Pipeline,
    EliGenQwenImagePipeline,
    EliGenZImagePipeline,
    Entity,
)
from eligen.cli import main
from eligen.entities import LayoutError, entity_to_dict, layout_from_dict
from eligen.generate import read_metadata
from eligen.models import TINY_MODEL_DIR

GRID = 8  # tokens per side: each family renders 8 x 8 image tokens (32 pixels for 4-pixel tokens)
M = 12  # max_sequence_length

# layer -> the stream it acts on, written here from the architectures (not read from the families); None: no token axis
FLUX_LAYERS = {
    "x_embedder": "image", "context_embedder": "text",
    "transformer_blocks.0.attn.to_q": "image", "transformer_blocks.0.ff.net.2": "image",
    "transformer_blocks.0.attn.add_k_proj": "text", "transformer_blocks.0.ff_context.net.0.proj": "text",
    "single_transformer_blocks.0.attn.to_v": "joint", "single_transformer_blocks.0.proj_out": "joint",
    "transformer_blocks.0.norm1.linear": None, "time_text_embed.timestep_embedder.linear_1": None,
}
QWEN_LAYERS = {
    "img_in": "image", "txt_in": "text",
    "transformer_blocks.0.attn.to_q": "image", "transformer_blocks.0.img_mlp.net.2": "image",
    "transformer_blocks.0.attn.add_v_proj": "text", "transformer_blocks.0.txt_mlp.net.0.proj": "text",
    "transformer_blocks.0.img_mod.1": None, "time_text_embed.timestep_embedder.linear_1": None,
}
FLUX2_LAYERS = {
    "x_embedder": "image", "context_embedder": "text",
    "transformer_blocks.0.attn.to_q": "image", "transformer_blocks.0.ff.linear_out": "image",
    "transformer_blocks.0.attn.add_k_proj": "text", "transformer_blocks.0.ff_context.linear_in": "text",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj": "joint", "single_transformer_blocks.0.attn.to_out": "joint",
    "double_stream_modulation_img.linear": None, "time_guidance_embed.timestep_embedder.linear_1": None,
}
KREA2_LAYERS = {  # the layer-wise fusion runs each text token's stack of encoder layers as a batch row
    "img_in": "image", "final_layer.linear": "image", "txt_in.linear_1": "text",
    "text_fusion.layerwise_blocks.0.attn.to_q": "text-rows", "text_fusion.layerwise_blocks.0.ff.down": "text-rows",
    "text_fusion.projector": "text", "text_fusion.refiner_blocks.0.attn.to_v": "text",
    "transformer_blocks.0.attn.to_gate": "joint", "transformer_blocks.0.ff.up": "joint", "time_mod_proj": None,
}
QWEN21_LAYERS = {  # one [text | image] sequence; after the first step the text rows come from the KV cache
    "img_in": "image", "txt_in.in_layer": "text",
    "transformer_blocks.0.attn.to_k": "joint", "transformer_blocks.0.img_mlp.out": "joint", "proj_out": "joint",
    "modulation.1": None,
}
Z_IMAGE_LAYERS = {  # Z-Image: its forwards pad, split and order the tokens their own way (see z_image_weight)
    "all_x_embedder.2-1": "patches", "cap_embedder.1": "captions",
    "noise_refiner.0.attention.to_q": "image", "noise_refiner.0.feed_forward.w2": "image",
    "context_refiner.0.attention.to_k": "refined", "context_refiner.0.feed_forward.w1": "refined",
    "layers.0.attention.to_v": "unified", "layers.1.feed_forward.w3": "unified",
    "all_final_layer.2-1.linear": "unified",
    "t_embedder.mlp.0": None, "layers.0.adaLN_modulation.0": None, "all_final_layer.2-1.adaLN_modulation.1": None,
}
Z_PAD = 32  # Z-Image pads every text segment and the image to a multiple of 32 tokens
FAMILIES = {"flux": (EliGenPipeline, "tiny_pipeline_dir", FLUX_LAYERS, "context_embedder"),
            "qwen_image": (EliGenQwenImagePipeline, "tiny_qwen_dir", QWEN_LAYERS, "txt_in"),
            "flux2": (EliGenFlux2Pipeline, "tiny_flux2_dir", FLUX2_LAYERS, "context_embedder"),
            "krea2": (EliGenKrea2Pipeline, "tiny_krea2_dir", KREA2_LAYERS, "txt_in.linear_1"),
            "qwen_image21": (EliGenQwenImage21Pipeline, "tiny_qwen21_dir", QWEN21_LAYERS, "txt_in.in_layer"),
            "z_image": (EliGenZImagePipeline, "tiny_z_image_dir", Z_IMAGE_LAYERS, "cap_embedder.1")}
EDIT_FAMILIES = {"flux_kontext": (EliGenFluxKontextPipeline, "tiny_kontext_dir", FLUX_LAYERS, "context_embedder")}
INPUT = Image.fromarray((np.random.RandomState(0).rand(48, 32, 3) * 255).astype(np.uint8))  # 12 x 8 input tokens
TOKEN_BOXES = ([0, 0, 4, 8], [2, 2, 8, 6])  # in tokens, overlapping: columns 0-3; rows 2-5 x columns 2-7


def random_lora(transformer, layers, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (A (r, in), B (out, r))}`` of rank 2 with non-zero B."""
    modules, g = dict(transformer.named_modules()), torch.Generator().manual_seed(seed)
    return {name: (torch.randn(2, modules[name].in_features, generator=g) * 0.3,
                   torch.randn(modules[name].out_features, 2, generator=g) * 0.3) for name in layers}


def save_lora(weights, path) -> str:
    state = {}
    for name, (down, up) in weights.items():
        state[f"transformer.{name}.lora_A.weight"] = down
        state[f"transformer.{name}.lora_B.weight"] = up
    save_file(state, str(path))
    return str(path)


def box_tokens(box) -> torch.Tensor:
    """``(n_img,)`` 0/1: the tokens of a box given in tokens, row-major."""
    x0, y0, x1, y1 = box
    cover = torch.zeros(GRID, GRID)
    cover[y0:y1, x0:x1] = 1
    return cover.flatten()


class Family:
    """A family's tiny pipeline, a plain twin for the reference, two random LoRAs and the stock segment lengths."""

    def __init__(self, name: str, request):
        self.name = name
        cls, folder_fixture, self.layers, self.first_text = {**FAMILIES, **EDIT_FAMILIES}[name]
        folder = request.getfixturevalue(folder_fixture)
        self.pipe, self.plain = cls.from_pretrained(folder), cls.from_pretrained(folder)
        for pipe in (self.pipe, self.plain):
            pipe.set_progress_bar_config(disable=True)
        self.token = token_pixels(self.pipe)
        self.boxes = [self.pixels(box) for box in TOKEN_BOXES]
        tmp = request.getfixturevalue("tmp_path_factory").mktemp(f"regional-lora-{name}")
        self.loras = [random_lora(self.plain.transformer, self.layers, seed) for seed in (1, 2)]
        self.files = [save_lora(w, tmp / f"lora{i}.safetensors") for i, w in enumerate(self.loras)]

    def pixels(self, box) -> list[int]:
        """A box given in tokens, in pixels."""
        return [v * self.token for v in box]

    def lengths(self, prompts) -> list[int]:
        """Each prompt's segment as the stock pipeline encodes a prompt alone: its attended tokens (Krea 2 drops its
        padding; Qwen-Image 2.1 takes no length)."""
        if isinstance(self.plain, EliGenKrea2Pipeline):
            return [int(self.plain.encode_prompt(prompt=p, max_sequence_length=M)[1].sum()) for p in prompts]
        if isinstance(self.plain, EliGenQwenImage21Pipeline):
            return [min(M, self.plain.encode_prompt(prompt=p)[0].shape[1]) for p in prompts]
        if isinstance(self.plain, EliGenZImagePipeline):  # a list of each prompt's real tokens
            return [len(self.plain.encode_prompt(prompt=p, max_sequence_length=M)[0][0]) for p in prompts]
        return [self.plain.encode_prompt(prompt=p, max_sequence_length=M)[0].shape[1] for p in prompts]


@pytest.fixture(scope="module")
def tiny_flux2_dir(tmp_path_factory):
    from eligen.families.flux2.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("regional-lora-flux2") / "pipe")


@pytest.fixture(scope="module")
def tiny_kontext_dir(tmp_path_factory):
    from eligen.families.flux.testing import save_tiny_kontext_pipeline

    return save_tiny_kontext_pipeline(tmp_path_factory.mktemp("regional-lora-kontext") / "pipe")


@pytest.fixture(scope="module")
def tiny_krea2_dir(tmp_path_factory):
    from eligen.families.krea2.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("regional-lora-krea2") / "pipe")


@pytest.fixture(scope="module")
def tiny_qwen21_dir(tmp_path_factory):
    from eligen.families.qwen_image21.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("regional-lora-qwen21") / "pipe")


@pytest.fixture(scope="module")
def tiny_z_image_dir(tmp_path_factory):
    from eligen.families.z_image.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("regional-lora-z-image") / "pipe")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return Family(request.param, request)


PROMPT, NEGATIVE, ENTITY_PROMPTS = "a red cat", "blurry", ["a cat", "a dog"]


def token_pixels(pipe) -> int:
    """Pixels per token side: the VAE's factor times the family's patch."""
    return pipe.vae_scale_factor * pipe.family.patch_size


def run(pipe, entities, cfg: bool = False, **kwargs) -> torch.Tensor:
    size = GRID * token_pixels(pipe)
    if isinstance(pipe, EliGenFluxKontextPipeline):  # the input kept at its size, and the output as asked
        kwargs.update(image=INPUT, max_area=size * size, _auto_resize=False, keep_outside=False)
    if getattr(pipe.transformer.config, "guidance_embeds", False):  # a guidance-distilled transformer
        kwargs.setdefault("guidance_scale", 3.5)
    return pipe(prompt=PROMPT, entities=entities, height=size, width=size, num_inference_steps=2,
                max_sequence_length=M, generator=torch.Generator().manual_seed(0), output_type="latent",
                true_cfg_scale=2.0 if cfg else 1.0, negative_prompt=NEGATIVE if cfg else None, **kwargs).images


def reference(family: Family, adapters, cfg: bool = False, boxes=None, **kwargs) -> torch.Tensor:
    """The plain pipeline (entities at ``boxes``, no LoRA) with every adapted layer's output plus
    ``sum_a (x A_a^T B_a^T) * w_a`` token by token.

    ``adapters``: ``[(lora weights, text weights (T,), image weights (n_img,))]`` for the positive branch; the
    negative branch (the second forward of each step with CFG; its text holds no entity's prompt, even in the entity
    slots of ``entities_on_negative``) gets the same image weights and 0 on its text."""
    state: dict = {"forwards": 0}
    per_step = 2 if cfg else 1
    entity_forwards = per_step * kwargs.get("entity_steps", 2)  # after entity_steps, no entity text is left
    z_image, on_negative = family.name == "z_image", kwargs.get("entities_on_negative", False)
    if z_image:  # the segments: the positive branch's, the negative's with entities_on_negative (all its prompt)
        state["lengths"] = {True: family.lengths([*ENTITY_PROMPTS, PROMPT]), False: family.lengths([NEGATIVE] * 3)}

    def branch(module, args, kwargs):
        count = state["forwards"]
        state["cond"] = count % per_step == 0 and count < entity_forwards
        # Z-Image: a branch with entity segments (the positive one, the negative with entities_on_negative) takes the
        # regional forward, the others diffusers' own; each forward runs its time embedder once
        state["regional"] = count < entity_forwards and (state["cond"] or on_negative)
        state["calls"] = {}
        if not z_image:
            state["text"] = kwargs["encoder_hidden_states"].shape[1]  # this branch's text tokens
        state["forwards"] += 1

    def added(name, stream):
        def hook(module, args, output):
            x = args[0]
            state["calls"][name] = state["calls"].get(name, -1) + 1
            for weights, text, image in adapters:
                down, up = weights[name]
                if z_image:
                    output = output + (x @ down.T @ up.T) * z_image_weight(state, name, stream, x, text, image)
                    continue
                text_row = text if state["cond"] else torch.zeros(state["text"])
                if stream == "text-rows":  # tokens on the first axis
                    weight = text_row.repeat(x.shape[0] // len(text_row)).view(-1, *[1] * (x.ndim - 1))
                else:
                    row = {"text": text_row, "image": image, "joint": torch.cat([text_row, image])}[stream]
                    if x.shape[1] > len(row):  # an edit model's input-image tokens, after the image's: untouched
                        row = torch.cat([row, torch.zeros(x.shape[1] - len(row))])
                    # a joint layer of fewer tokens runs the image rows (their text rows were cached)
                    weight = row[-x.shape[1]:].view(1, -1, *[1] * (x.ndim - 2))
                output = output + (x @ down.T @ up.T) * weight
            return output
        return hook

    modules = dict(family.plain.transformer.named_modules())
    counted = modules["t_embedder"] if z_image else family.plain.transformer  # once per forward
    handles = [counted.register_forward_pre_hook(branch, with_kwargs=True)]
    handles += [modules[name].register_forward_hook(added(name, stream)) for name, stream in family.layers.items()
                if stream is not None]  # a layer without a token axis: the entity LoRA is not applied
    try:
        return run(family.plain, [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, boxes or family.boxes, strict=True)],
                   cfg, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def z_image_weight(state: dict, name: str, stream: str, x: torch.Tensor, text: torch.Tensor,
                   image: torch.Tensor) -> torch.Tensor:
    """Z-Image's token weights for a layer of ``stream`` given ``x``, from the rules: a text segment's padding (to a
    multiple of 32) takes its segment's weight, the image's padding 0; the regional forward refines the segments one
    at a time and runs ``[e_1 | e_2 | global | image padding | image]`` through the main layers, diffusers' forward
    ``[image | image padding | caption]``; the embedders see the tokens flat (the regional forward: segment by
    segment). A branch without the entities' text has weight 0 on every text token."""
    image_pad = torch.zeros(-len(image) % Z_PAD)
    image_row = torch.cat([image, image_pad])
    calls = state["calls"][name]  # the how-many-th call of the layer in this forward
    segments = []  # the regional forward's padded segments; none in diffusers' forward of a text with no entity
    if state["regional"]:
        start = 0
        for n in state["lengths"][state["cond"]]:
            own = text[start] if state["cond"] else torch.tensor(0.0)
            segments.append(own.expand(n + (-n % Z_PAD)))
            start += n
    if stream == "patches":
        return image_row.view(-1, 1)
    if stream == "image":
        return image_row.view(1, -1, 1)
    if stream == "captions":  # flat
        return (torch.cat(segments) if segments else torch.zeros(x.shape[0])).view(-1, 1)
    if stream == "refined":
        return (segments[calls] if segments else torch.zeros(x.shape[1])).view(1, -1, 1)
    if segments:  # unified
        return torch.cat([*segments, image_pad, image]).view(1, -1, 1)
    return torch.cat([image_row, torch.zeros(x.shape[1] - len(image_row))]).view(1, -1, 1)


def text_weights(family: Family, scales) -> torch.Tensor:
    """``(T,)``: each entity's scale on its own segment, 0 on the global prompt's."""
    lengths = family.lengths([*ENTITY_PROMPTS, PROMPT])
    return torch.cat([torch.full((n,), float(s)) for n, s in zip(lengths, [*scales, 0.0], strict=True)])


@pytest.mark.parametrize("cfg, on_negative", [(False, False), (True, False), (True, True)],
                         ids=["no-cfg", "cfg", "cfg-entities-on-negative"])
def test_two_entity_loras_equal_the_masked_reference(family, cfg, on_negative):
    """Entity 0 carries LoRA 0 at 0.7, entity 1 LoRA 1 at 1.3; their masks overlap (both deltas add there)."""
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.7),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1], lora=family.files[1], lora_scale=1.3)]
    got = run(family.pipe, entities, cfg, entities_on_negative=on_negative)
    want = reference(family, [(family.loras[0], text_weights(family, [0.7, 0]), 0.7 * box_tokens(TOKEN_BOXES[0])),
                              (family.loras[1], text_weights(family, [0, 1.3]), 1.3 * box_tokens(TOKEN_BOXES[1]))], cfg,
                     entities_on_negative=on_negative)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, run(family.pipe, [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, family.boxes,
                                                                                    strict=True)], cfg,
                                    entities_on_negative=on_negative))
    assert family.pipe.get_active_adapters() == []  # the entity adapters are off outside the call


def test_z_image_places_padding_and_batch_padding_by_the_rules():
    """Z-Image's token tables where the pipeline test does not reach: image padding (30 tokens -> 32) and a batch
    whose samples pad to different lengths (written here from the rules: a segment's padding is its segment's first
    token, the image's padding and the batch's -1; the regional order ``[segments | image padding | image]``,
    diffusers' ``[image | image padding | caption]``); and the weights a placed stream gives."""
    from eligen.families.z_image.model import Layout
    from eligen.families.z_image.regional_lora import place_refined_segment, place_regional, place_stock
    from eligen.regional.lora import LoraTokens

    def full(n, value):
        return torch.full((n,), value)

    image, none = 34 + torch.arange(30), full(2, -1)  # raw text [e_1 (1) | global (33)], then the image
    tokens = LoraTokens({"a": torch.arange(34.0)[None]}, {"a": 100 + torch.arange(30.0)[None]})
    layout = Layout(real=((1, 33), (1, 1)), raw=(1, 33), n_img=30)
    place_regional(tokens, layout, torch.device("cpu"))
    e1, global0, global1 = full(32, 0), torch.cat([1 + torch.arange(33), full(31, 1)]), full(32, 1)
    assert torch.equal(tokens.placed["z-image-unified"], torch.stack([
        torch.cat([e1, global0, none, image]), torch.cat([e1, global1, none, image, full(32, -1)])]))
    assert torch.equal(tokens.placed["z-image-captions"], torch.cat([e1, e1, global0, global1]))
    assert torch.equal(tokens.placed["z-image-patches"], torch.cat([image, none, image, none]))
    place_refined_segment(tokens, layout, 1, torch.device("cpu"))
    refined = torch.stack([global0, torch.cat([global1, full(32, -1)])])
    assert torch.equal(tokens.placed["z-image-refined-text"], refined)
    stock = Layout(real=((5,), (3,)), raw=(5,), n_img=30)
    place_stock(tokens, stock, torch.device("cpu"))
    image = 5 + torch.arange(30)
    captions = [torch.cat([torch.arange(5), full(27, 0)]), torch.cat([torch.arange(3), full(29, 0)])]
    assert torch.equal(tokens.placed["z-image-unified"], torch.stack([torch.cat([image, none, c]) for c in captions]))
    assert torch.equal(tokens.placed["z-image-refined-text"], torch.stack(captions))
    # a placed stream's weights: the [text | image] weight of each token's place, 0 for -1
    tokens.place("s", torch.tensor([[33, 34, -1]]))
    assert torch.equal(tokens.weight("a", "s", (1, 3, 8)), torch.tensor([33.0, 100.0, 0.0]).view(1, 3, 1))
    with pytest.raises(ValueError, match="gives \\(1, 4, 8\\) where the family's forward placed \\(1, 3\\)"):
        tokens.weight("a", "s", (1, 4, 8))
    with pytest.raises(ValueError, match="or one the family's forward placed, got 'unplaced'"):
        tokens.weight("a", "unplaced", (1, 3, 8))


@pytest.fixture(scope="module")
def kontext(request):
    return Family("flux_kontext", request)


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_an_edit_model_s_input_tokens_are_left_alone(kontext, cfg):
    """FLUX.1 Kontext: the input image's tokens follow the image tokens in the image and joint streams; the entity
    LoRA reaches none of them."""
    family = kontext
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.7),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    want = reference(family, [(family.loras[0], text_weights(family, [0.7, 0]), 0.7 * box_tokens(TOKEN_BOXES[0]))],
                     cfg)
    torch.testing.assert_close(run(family.pipe, entities, cfg), want, atol=1e-5, rtol=1e-5)


def test_entity_steps_keep_the_image_tokens_after_the_entity_text_is_gone(family):
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.7),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    want = reference(family, [(family.loras[0], text_weights(family, [0.7, 0]), 0.7 * box_tokens(TOKEN_BOXES[0]))],
                     entity_steps=1)
    torch.testing.assert_close(run(family.pipe, entities, entity_steps=1), want, atol=1e-5, rtol=1e-5)


def test_one_lora_on_two_entities_is_the_union_at_the_larger_scale(family):
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.5),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1], lora=family.files[0], lora_scale=-1.5)]
    image = torch.where(box_tokens(TOKEN_BOXES[1]) > 0, -1.5, 0.5 * box_tokens(TOKEN_BOXES[0]))
    want = reference(family, [(family.loras[0], text_weights(family, [0.5, -1.5]), image)])
    torch.testing.assert_close(run(family.pipe, entities), want, atol=1e-5, rtol=1e-5)


def test_scale_zero_is_no_lora_bit_for_bit(family):
    plain = [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, family.boxes, strict=True)]
    zero = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.0), plain[1]]
    assert torch.equal(run(family.pipe, zero), run(family.pipe, plain))


def test_a_mask_over_everything_is_the_lora_on_the_image_and_its_own_text(family):
    full = family.pixels([0, 0, GRID, GRID])
    entities = [Entity(ENTITY_PROMPTS[0], box=full, lora=family.files[0]),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    want = reference(family, [(family.loras[0], text_weights(family, [1.0, 0]), torch.ones(GRID * GRID))],
                     boxes=[full, family.boxes[1]])
    torch.testing.assert_close(run(family.pipe, entities), want, atol=1e-5, rtol=1e-5)


def test_other_entities_text_is_unchanged_at_the_first_layer(family):
    """The first text layer's output: entity 0's rows change with its LoRA, entity 1's and the global prompt's do
    not (bit for bit)."""
    outputs = []
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0]),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    for scale in (1.0, 0.0):
        entities[0].lora_scale = scale
        run(family.pipe, entities)  # loads the adapter, so the layer is peft's wrapper from here on
        handle = dict(family.pipe.transformer.named_modules())[family.first_text].register_forward_hook(
            lambda module, args, output: outputs.append(output.detach().clone()))
        try:
            run(family.pipe, entities)
        finally:
            handle.remove()
    first_with, first_without = outputs[0], outputs[2]  # two steps per run: the first forward of each
    n0 = family.lengths(ENTITY_PROMPTS[:1])[0]
    if family.name == "z_image":  # the caption embedder's tokens are flat, the segment's padding is its own
        first_with, first_without, n0 = first_with[None], first_without[None], n0 + (-n0 % Z_PAD)
    assert not torch.equal(first_with[:, :n0], first_without[:, :n0])
    assert torch.equal(first_with[:, n0:], first_without[:, n0:])


@pytest.fixture(scope="module")
def flux(request):
    return Family("flux", request)


@pytest.mark.parametrize("attention", ["segmented", "flex"])
def test_every_attention_form(flux, attention):
    family = flux
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.7),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    want = reference(family, [(family.loras[0], text_weights(family, [0.7, 0]), 0.7 * box_tokens(TOKEN_BOXES[0]))],
                     attention="dense")
    torch.testing.assert_close(run(family.pipe, entities, attention=attention), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_inpainting_keeps_the_masked_lora_and_the_input_outside(flux, cfg):
    """Inpainting fusion with an entity LoRA: the masked reference under the same fusion; the latents outside the
    entities' union end at the input's."""
    family = flux
    size = GRID * token_pixels(family.pipe)
    source = Image.fromarray((np.random.RandomState(1).rand(size, size, 3) * 255).astype(np.uint8))
    entities = [Entity(ENTITY_PROMPTS[0], box=family.boxes[0], lora=family.files[0], lora_scale=0.9),
                Entity(ENTITY_PROMPTS[1], box=family.boxes[1])]
    got = run(family.pipe, entities, cfg, image=source, inpaint=True)
    want = reference(family, [(family.loras[0], text_weights(family, [0.9, 0]), 0.9 * box_tokens(TOKEN_BOXES[0]))],
                     cfg, image=source, inpaint=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    without = run(family.pipe, [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, family.boxes, strict=True)], cfg,
                  image=source, inpaint=True)
    outside = box_tokens(TOKEN_BOXES[0]) + box_tokens(TOKEN_BOXES[1]) == 0  # (n_img,) tokens outside the union
    assert outside.any() and torch.equal(got[:, outside], without[:, outside])  # both at the input's latents
    assert not torch.equal(got, without)


# -- the layout file, the record, the CLI -----------------------------------------------------------------------


def test_layout_fields_parse_resolve_and_round_trip(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"")
    data = {"prompt": "p", "width": 32, "height": 32, "entities": [
        {"prompt": "a", "box": [0, 0, 16, 16], "lora": "style.safetensors", "lora_scale": 0.5},
        {"prompt": "b", "box": [0, 0, 16, 16], "lora": "some-adapter"}]}
    layout = layout_from_dict(data, base_dir=tmp_path)
    assert layout.entities[0].lora == str(tmp_path / "style.safetensors") and layout.entities[0].lora_scale == 0.5
    assert layout.entities[1].lora == "some-adapter" and layout.entities[1].lora_scale == 1.0  # a name, as written
    assert entity_to_dict(layout.entities[0])["lora"] == str(tmp_path / "style.safetensors")
    assert entity_to_dict(layout.entities[0])["lora_scale"] == 0.5
    assert "lora" not in entity_to_dict(Entity("x", box=[0, 0, 4, 4]))


@pytest.mark.parametrize("field, value, message", [
    ("lora", 3, "a LoRA is a file"), ("lora", " ", "a LoRA is a file"),
    ("lora_scale", "1", "must be a number"), ("lora_scale", True, "must be a number"),
    ("lora_scale", 1e9, "must be a number"), ("lora_scale", float("nan"), "must be a number")])
def test_bad_lora_fields_are_refused_by_entity_and_field(field, value, message):
    data = {"prompt": "p", "width": 32, "height": 32,
            "entities": [{"prompt": "a", "box": [0, 0, 8, 8]}, {"prompt": "b", "box": [0, 0, 8, 8], field: value}]}
    with pytest.raises(LayoutError, match=message) as info:
        layout_from_dict(data)
    assert (info.value.entity, info.value.field) == (1, field)


def test_a_missing_or_unfit_lora_file_is_refused_by_entity(flux, tmp_path):
    entities = [Entity("a", box=flux.boxes[0], lora="no/such-lora.safetensors")]
    with pytest.raises(LayoutError, match=r"entity 0, field 'lora': LoRA not found"):
        run(flux.pipe, entities)
    # a file with text-encoder layers is refused as a global LoRA is (eligen loads transformer LoRAs only)
    down, up = flux.loras[0]["x_embedder"]
    save_file({"transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": up,
               "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.zeros(2, 8),
               "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.zeros(8, 2)},
              str(tmp_path / "te.safetensors"))
    entities[0].lora = str(tmp_path / "te.safetensors")
    with pytest.raises(LayoutError, match=r"entity 0, field 'lora': .*do not exist in this transformer"):
        run(flux.pipe, entities)


def test_layers_without_a_token_axis_are_left_alone(family):
    """A LoRA of modulation and timestep layers only: as an entity's LoRA it changes nothing, bit for bit."""
    none = [name for name, stream in family.layers.items() if stream is None]
    odd = random_lora(family.plain.transformer, none, 3)
    entities = [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, family.boxes, strict=True)]
    plain = run(family.pipe, entities)
    entities[0].lora = save_lora(odd, family.files[0].replace("lora0", "modulation"))
    assert torch.equal(run(family.pipe, entities), plain)


def test_an_adapter_active_globally_stays_global(tiny_pipeline_dir, flux, caplog):
    """An entity naming an adapter on the global LoRA list leaves it global (warned), whatever its mask."""
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_eligen_lora(flux.files[0], adapter_name="style")
    plain = [Entity(p, box=b) for p, b in zip(ENTITY_PROMPTS, flux.boxes, strict=True)]
    named = [Entity(ENTITY_PROMPTS[0], box=flux.boxes[0], lora="style"), plain[1]]
    with caplog.at_level("WARNING", logger="eligen.pipelines"):
        assert torch.equal(run(pipe, named), run(pipe, plain))
    assert "entity 0: the LoRA style is active globally, so it stays global" in caplog.text
    assert pipe.get_active_adapters() == ["style"]


def test_a_family_without_a_stream_table_refuses_an_entity_lora_by_entity_and_field(tiny_pipeline_dir, monkeypatch):
    """A family that has not said which layer acts on which tokens: an entity LoRA is refused before anything
    loads."""
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(type(pipe.family), "lora_streams", ())
    with pytest.raises(LayoutError, match=r"entity 1, field 'lora': FLUX.1 has no regional LoRA yet"):
        run(pipe, [Entity("a", box=[0, 0, 32, 32]), Entity("b", box=[0, 0, 32, 32], lora="style.safetensors")])
    assert not getattr(pipe.transformer, "peft_config", None)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_cli_renders_an_entity_lora_records_it_and_from_reproduces_it(tmp_path, capsys):
    base = EliGenPipeline.from_pretrained("eligen-tiny", load_default_lora=False)
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
              "single_transformer_blocks.0.proj_out"]
    save_lora({k: (a * 3, b * 3) for k, (a, b) in random_lora(base.transformer, layers, 5).items()},
              tmp_path / "style.safetensors")
    example = json.loads((TINY_MODEL_DIR.parents[3] / "examples" / "tiny_two_shapes.json").read_text())
    example["entities"][0].update(lora="style.safetensors", lora_scale=0.9)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(example))
    fast = ["--steps", "2", "--no-progress", "--seed", "3"]
    assert main(["generate", str(layout), *fast, "-o", str(tmp_path / "lora.png")]) == 0
    example["entities"][0].pop("lora")
    (tmp_path / "plain.json").write_text(json.dumps(example))
    assert main(["generate", str(tmp_path / "plain.json"), *fast, "-o", str(tmp_path / "plain.png")]) == 0
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "plain.png")).max() > 2
    recorded = read_metadata(tmp_path / "lora.png")["layout"]["entities"][0]
    assert recorded["lora"] == str(tmp_path / "style.safetensors") and recorded["lora_scale"] == 0.9
    assert main(["generate", "--from", str(tmp_path / "lora.png"), "--no-progress", "-o",
                 str(tmp_path / "again.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "lora.png"))
    assert re.search("style.safetensors", json.dumps(read_metadata(tmp_path / "again.png")["layout"]))
    example["entities"][0]["lora"] = "missing.safetensors"  # refused by entity and field before the model loads
    layout.write_text(json.dumps(example))
    capsys.readouterr()
    assert main(["generate", str(layout), *fast, "-o", str(tmp_path / "missing.png")]) != 0
    assert "entity 0, field 'lora': LoRA not found: missing.safetensors" in capsys.readouterr().err
