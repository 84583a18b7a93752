"""EliGenQwenImageEditPlusPipeline on the tiny random Qwen-Image-Edit-Plus pipeline (docs/design.md section 21).

The tiny pipeline has VAE scale factor 2: a 32x32 output is an 8x8 token grid (n_img = 64). diffusers sizes the
input for the VAE at about 1024x1024 and for the text encoder at about 384x384 (module constants); the tests set them
to 32x32 (64 reference tokens) and 56x56 (the tiny vision tower's 2x2 merged 14-pixel patches), for the stock and
the EliGen pipeline alike. The reference is written from the rules: each entity instruction encoded alone with the
edit template and no image, the global instruction with the image as the stock pipeline encodes it,
``[e_1 | ... | e_N | global | image | reference]``, text RoPE restarting for every segment, the suite's mask oracle
with the reference tokens covered by every entity, attention as an explicit masked softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock_module
from PIL import Image

import eligen.families.qwen_image.processor  # noqa: F401  (the saved pipelines name their processor class there)
from eligen import EliGenQwenImageEditPlusPipeline, Entity
from eligen.families import model_card
from eligen.families.qwen_image.testing import save_tiny_edit_pipeline
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
    return {"full": save_tiny_edit_pipeline(root / "full"), "one": save_tiny_edit_pipeline(root / "one", layers=1)}


@pytest.fixture(scope="module")
def pipes(dirs):
    return load(EliGenQwenImageEditPlusPipeline, dirs["full"]), load(QwenImageEditPlusPipeline, dirs["full"])


def test_the_checkpoint_is_served_by_the_edit_card(dirs):
    card = model_card(str(dirs["full"]))
    assert card.pipeline_class_name == "EliGenQwenImageEditPlusPipeline" and card.name == "qwen_image"


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


def reference_run(stock, entities, seed, **call):
    segments = [stock._get_qwen_prompt_embeds(e.prompt, image=None)[0] for e in entities]
    side = stock_module.calculate_dimensions(stock_module.CONDITION_IMAGE_SIZE, 1.0)
    condition = [stock.image_processor.resize(INPUT, side[1], side[0])]
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


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_entities_equal_the_reference(pipes, attention):
    ours, stock = pipes
    mine = ours(**kwargs(), entities=ENTITIES, keep_outside=False, attention=attention, generator=gen(4)).images
    torch.testing.assert_close(mine, reference_run(stock, ENTITIES, 4), atol=1e-5, rtol=1e-5)
    plain = ours(**kwargs(), generator=gen(4)).images
    assert (mine - plain).abs().max() > 1e-3  # the entities matter


def test_entities_with_true_cfg_equal_the_reference(pipes):
    ours, stock = pipes
    mine = ours(**kwargs(negative_prompt="blurry"), entities=ENTITIES, keep_outside=False, generator=gen(5)).images
    torch.testing.assert_close(mine, reference_run(stock, ENTITIES, 5, negative_prompt="blurry"), atol=1e-5,
                               rtol=1e-5)


# -- locality and keep-outside ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_an_entity_instruction_moves_only_the_tokens_it_covers(dirs, attention):
    pipe = load(EliGenQwenImageEditPlusPipeline, dirs["one"])
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


def test_cli_edit_end_to_end(dirs, tmp_path):
    import json

    from eligen.cli import main
    from eligen.generate import read_metadata

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "seed": 3, "negative_prompt": "blurry",
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]}]}))
    photo = tmp_path / "photo.png"
    INPUT.save(photo)
    out = tmp_path / "edited.png"
    assert main(["edit", str(photo), str(layout), "-o", str(out), "--model", str(dirs["full"]), "--steps", "2"]) == 0
    assert read_metadata(out)["command"] == "edit"
    union = Entity("x", box=(2, 2, 14, 10)).rasterize(W, H)
    before, after = np.asarray(INPUT), np.asarray(Image.open(out))
    assert np.array_equal(before[~union], after[~union]) and not np.array_equal(before[union], after[union])
    again = tmp_path / "again.png"
    assert main(["edit", "--from", str(out), "-o", str(again)]) == 0
    assert np.array_equal(after, np.asarray(Image.open(again)))
