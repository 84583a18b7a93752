"""EliGenQwenImageEditPlusPipeline and EliGenQwenImageEditPipeline on the tiny random Qwen-Image-Edit-Plus and
Qwen-Image-Edit pipelines (docs/design.md section 21); ``kind`` "plus" / "single" names which.

The tiny pipelines have VAE scale factor 2: a 32x32 output is an 8x8 token grid (n_img = 64). diffusers' Plus
pipeline sizes the input for the VAE at about 1024x1024 and for the text encoder at about 384x384 (module
constants); the tests set them to 32x32 (64 reference tokens) and 56x56 (the tiny vision tower's 2x2 merged 14-pixel
patches). The single-image pipeline sizes its one input (for both) with ``calculate_dimensions(1024 * 1024, ratio)``:
the tests make that 32x32. Stock and EliGen pipelines alike. The reference is written from the rules: each entity
instruction encoded alone with the Plus edit template and no image (for the single-image model too: its template
less the vision block is that template), the global instruction with the image as the stock pipeline encodes it,
``[e_1 | ... | e_N | global | image | reference]``, text RoPE restarting for every segment, the suite's mask oracle
with the reference tokens covered by every entity, attention as an explicit masked softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as single_module
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock_module
from PIL import Image

import eligen.families.qwen_image.processor  # noqa: F401  (the saved pipelines name their processor class there)
from eligen import EliGenQwenImageEditPipeline, EliGenQwenImageEditPlusPipeline, Entity
from eligen.families import model_card
from eligen.families.qwen_image.testing import save_tiny_edit_pipeline, save_tiny_single_edit_pipeline
from families import oracles
from reference import reference_mask_segments

H = W = 32
N_IMG = (H // 4) * (W // 4)
N_REF = 64
PROMPT = "a red circle on a blue background"
ENTITIES = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a cat on a red background", box=(16, 12, 30, 30))]
INPUT = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module", autouse=True)
def small_inputs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stock_module, "VAE_IMAGE_SIZE", 32 * 32)
        patch.setattr(stock_module, "CONDITION_IMAGE_SIZE", 56 * 56)
        calculate = single_module.calculate_dimensions
        patch.setattr(single_module, "calculate_dimensions", lambda area, ratio: calculate(32 * 32, ratio))
        yield


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kwargs(**overrides):
    base = dict(image=INPUT, prompt=PROMPT, height=H, width=W, num_inference_steps=2, output_type="latent")
    base.update(overrides)
    return base


def load(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_edit")
    return {"plus": save_tiny_edit_pipeline(root / "full"), "one": save_tiny_edit_pipeline(root / "one", layers=1),
            "single": save_tiny_single_edit_pipeline(root / "single")}


KINDS = {"plus": (EliGenQwenImageEditPlusPipeline, QwenImageEditPlusPipeline),
         "single": (EliGenQwenImageEditPipeline, QwenImageEditPipeline)}


@pytest.fixture(scope="module")
def all_pipes(dirs):
    """kind -> ``(EliGen pipeline, stock pipeline)`` on the same weights (call them, never change them)."""
    return {kind: (load(ours, dirs[kind]), load(stock, dirs[kind])) for kind, (ours, stock) in KINDS.items()}


@pytest.fixture
def pipes(all_pipes, kind):
    return all_pipes[kind]


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


def test_the_checkpoint_is_served_by_the_edit_card(dirs, kind):
    card = model_card(str(dirs[kind]))
    assert card.pipeline_class_name == KINDS[kind][0].__name__ and card.name == "qwen_image"
    assert "edit" in card.features


@pytest.mark.parametrize(("hub_id", "kind"), [("Qwen/Qwen-Image-Edit", "single"), ("Qwen/Qwen-Image-Edit-2509", "plus"),
                                               ("Qwen/Qwen-Image-Edit-2511", "plus")])
def test_an_uncached_hub_id_is_read_by_its_name(hub_id, kind):
    assert model_card(hub_id).pipeline_class_name == KINDS[kind][0].__name__


@pytest.mark.parametrize("output_type", ["latent", "pt"])
@pytest.mark.parametrize("cfg", [{}, {"negative_prompt": "blurry"}], ids=["no-cfg", "cfg"])
def test_zero_entities_equal_stock(pipes, cfg, output_type):
    ours, stock = pipes
    mine = ours(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)


# -- the reference ------------------------------------------------------------------------------------------------


def cover_tokens(entity) -> list[bool]:
    return oracles.token_cover(entity.rasterize(W, H), H, W, 2, 2)


class ReferenceProcessor:
    """One Qwen-Image block's joint attention written out: the text positions restart in every segment (the rope
    table's text part indexed per segment), the mask applies to the regional sequence (other lengths: none)."""

    def __init__(self, lengths, mask):
        self.lengths, self.mask = lengths, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        heads, text_len = attn.heads, encoder_hidden_states.shape[1]
        regional = text_len == sum(self.lengths)
        img_freqs, txt_freqs = image_rotary_emb
        if regional:
            txt_freqs = txt_freqs[[j for n in self.lengths for j in range(n)]]

        def project(x, proj, norm, freqs):
            return apply_rotary_emb_qwen(norm(proj(x).unflatten(-1, (heads, -1))), freqs, use_real=False)

        q = torch.cat([project(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q, txt_freqs),
                       project(hidden_states, attn.to_q, attn.norm_q, img_freqs)], dim=1)
        k = torch.cat([project(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k, txt_freqs),
                       project(hidden_states, attn.to_k, attn.norm_k, img_freqs)], dim=1)
        v = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, (heads, -1)),
                       attn.to_v(hidden_states).unflatten(-1, (heads, -1))], dim=1)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if regional:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
        return attn.to_out[0](out[:, text_len:]), attn.to_add_out(out[:, :text_len])


def reference_run(all_pipes, kind, entities, seed, **call):
    """The stock pipeline of ``kind`` with the rules' sequence and mask; entity segments from the Plus pipeline's
    template (the same random text encoder in both tiny pipelines)."""
    plus, stock = all_pipes["plus"][1], all_pipes[kind][1]
    segments = [plus._get_qwen_prompt_embeds(e.prompt, image=None)[0] for e in entities]
    if kind == "plus":
        side = stock_module.calculate_dimensions(stock_module.CONDITION_IMAGE_SIZE, 1.0)
        condition = [stock.image_processor.resize(INPUT, side[1], side[0])]
    else:  # one image, at the VAE's size, in the template's own vision block
        condition = stock.image_processor.resize(INPUT, H, W)
    segments.append(stock._get_qwen_prompt_embeds(PROMPT, image=condition)[0])
    lengths = [s.shape[1] for s in segments]
    covers = [cover_tokens(e) + [True] * N_REF for e in entities]
    mask = reference_mask_segments(covers, lengths[:-1], lengths[-1], N_IMG + N_REF)
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor(ReferenceProcessor(lengths, mask))
    try:
        return stock(**kwargs(prompt=None, prompt_embeds=torch.cat(segments, dim=1), **call),
                     generator=gen(seed)).images
    finally:
        stock.transformer.set_attn_processor(originals)


@pytest.mark.parametrize(("kind", "attention"), [("plus", "dense"), ("plus", "flex"), ("plus", "segmented"),
                                                 ("single", "dense")])
def test_entities_equal_the_reference(all_pipes, kind, attention):
    ours, _ = all_pipes[kind]
    mine = ours(**kwargs(), entities=ENTITIES, keep_outside=False, attention=attention, generator=gen(4)).images
    torch.testing.assert_close(mine, reference_run(all_pipes, kind, ENTITIES, 4), atol=1e-5, rtol=1e-5)
    plain = ours(**kwargs(), generator=gen(4)).images
    assert (mine - plain).abs().max() > 1e-3  # the entities matter


def test_entities_with_true_cfg_equal_the_reference(all_pipes, kind):
    ours, _ = all_pipes[kind]
    mine = ours(**kwargs(negative_prompt="blurry"), entities=ENTITIES, keep_outside=False, generator=gen(5)).images
    torch.testing.assert_close(mine, reference_run(all_pipes, kind, ENTITIES, 5, negative_prompt="blurry"),
                               atol=1e-5, rtol=1e-5)


def test_single_image_entity_instructions_leave_the_vision_block_out(all_pipes):
    """The single-image template less its vision block is the Plus template: the same segment. The template as it
    is cannot encode text without its image (the processor refuses an image placeholder with no image)."""
    single, plus = all_pipes["single"][0], all_pipes["plus"][0]
    mine = single.family.instruction_embeds(single, "a dog")
    assert torch.equal(mine, plus.family.instruction_embeds(plus, "a dog"))
    assert "<|image_pad|>" in single.prompt_template_encode  # the template is left as it was
    with pytest.raises(ValueError, match="no images were passed"):
        all_pipes["single"][1]._get_qwen_prompt_embeds("a dog", image=None)
    template = single.prompt_template_encode
    single.prompt_template_encode = plus.prompt_template_encode  # a template without the block: refused by name
    try:
        with pytest.raises(ValueError, match="has no vision block"):
            single.family.instruction_embeds(single, "a dog")
    finally:
        single.prompt_template_encode = template


# -- locality and keep-outside ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_an_entity_instruction_moves_only_the_tokens_it_covers(dirs, attention):
    pipe = load(EliGenQwenImageEditPlusPipeline, dirs["one"])  # the rule is the same for both kinds
    assert len(pipe.transformer.transformer_blocks) == 1

    def one_step(first_prompt):
        entities = [Entity(first_prompt, box=ENTITIES[0].box), ENTITIES[1]]
        return pipe(**kwargs(num_inference_steps=1), entities=entities, keep_outside=False, attention=attention,
                    generator=gen(6)).images[0]

    moved = (one_step("a dog") - one_step("a cat")).abs().amax(dim=-1) > 0  # same length: same layout
    inside = torch.tensor(cover_tokens(ENTITIES[0]))
    assert not moved[~inside].any() and moved[inside].any()


def test_keep_outside_leaves_the_input_outside_the_union(pipes):
    ours, _ = pipes
    call = kwargs(height=None, width=None)
    out = ours(**call, entities=ENTITIES, generator=gen(7)).images
    z_init = ours.encode_image_latents(np.array(INPUT), out.device, out.dtype)[0]
    outside = ~(torch.tensor(cover_tokens(ENTITIES[0])) | torch.tensor(cover_tokens(ENTITIES[1])))
    assert torch.equal(out[0][outside], z_init[outside])
    assert (out[0][~outside] - z_init[~outside]).abs().max() > 1e-3
    free = ours(**kwargs(), entities=ENTITIES, keep_outside=False, generator=gen(7)).images
    assert (free[0][outside] - z_init[outside]).abs().max() > 1e-3  # off: the model may touch everything


def test_cli_edit_end_to_end(dirs, kind, tmp_path):
    import json

    from eligen.cli import main
    from eligen.generate import read_metadata

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "seed": 3, "negative_prompt": "blurry",
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]}]}))
    photo = tmp_path / "photo.png"
    INPUT.save(photo)
    out = tmp_path / "edited.png"
    assert main(["edit", str(photo), str(layout), "-o", str(out), "--model", str(dirs[kind]), "--steps", "2"]) == 0
    assert read_metadata(out)["command"] == "edit"
    union = Entity("x", box=(2, 2, 14, 10)).rasterize(W, H)
    before, after = np.asarray(INPUT), np.asarray(Image.open(out))
    assert np.array_equal(before[~union], after[~union]) and not np.array_equal(before[union], after[union])
    again = tmp_path / "again.png"
    assert main(["edit", "--from", str(out), "-o", str(again)]) == 0
    assert np.array_equal(after, np.asarray(Image.open(again)))
