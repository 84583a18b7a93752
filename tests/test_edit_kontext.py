"""EliGenFluxKontextPipeline on the tiny random FLUX.1 Kontext pipeline (docs/design.md section 21).

The tiny pipeline has VAE scale factor 2: a 32x32 output is an 8x8 token grid (n_img = 64), and the 48x32 input
(height x width, kept at its size with ``_auto_resize=False``) is 12x8 = 96 reference tokens. The reference is
written from the rules: every prompt T5-encoded padded to ``max_sequence_length``, ``[e_1 | ... | e_N | global |
image | reference]``, the mask from the suite's oracle with the reference tokens covered by every entity, attention
as an explicit masked softmax in every double- and single-stream block; the stock pipeline runs the loop around it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image

import eligen
from eligen import EliGenFluxKontextPipeline, Entity
from eligen.families import model_card
from eligen.families.flux.testing import save_tiny_kontext_pipeline
from families import oracles
from reference import reference_mask_segments

H = W = 32
N_IMG = (H // 4) * (W // 4)
N_REF = (48 // 4) * (32 // 4)
MSL = 16
PROMPT = "a red circle on a gray background"
ENTITIES = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a blue square", box=(16, 12, 30, 30))]
INPUT = Image.fromarray((np.random.RandomState(0).rand(48, 32, 3) * 255).astype(np.uint8))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kwargs(**overrides):
    base = dict(image=INPUT, prompt=PROMPT, height=H, width=W, max_area=H * W, num_inference_steps=2,
                max_sequence_length=MSL, output_type="latent", _auto_resize=False)
    base.update(overrides)
    return base


def load(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext")
    return {"full": save_tiny_kontext_pipeline(root / "full"),
            "one": save_tiny_kontext_pipeline(root / "one", layers=1)}


@pytest.fixture(scope="module")
def pipes(dirs):
    """``(EliGen pipeline, stock pipeline)`` on the same weights (call them, never change them)."""
    return load(EliGenFluxKontextPipeline, dirs["full"]), load(FluxKontextPipeline, dirs["full"])


def test_the_checkpoint_is_served_by_the_kontext_card(dirs):
    card = model_card(str(dirs["full"]))
    assert card.pipeline_class_name == "EliGenFluxKontextPipeline" and card.name == "flux"
    assert eligen.EliGenFluxKontextPipeline is EliGenFluxKontextPipeline
    with pytest.raises(ValueError, match="EliGenFluxKontextPipeline"):
        eligen.EliGenPipeline.from_pretrained(dirs["full"])


# -- zero entities: the stock pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["latent", "pt"])
@pytest.mark.parametrize("cfg", [{}, {"true_cfg_scale": 2.5, "negative_prompt": "blurry"}], ids=["no-cfg", "cfg"])
def test_zero_entities_equal_stock(pipes, cfg, output_type):
    ours, stock = pipes
    mine = ours(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_zero_entities_equal_stock_without_an_image_and_at_the_stock_size(pipes):
    ours, stock = pipes
    call = kwargs(image=None, height=None, width=40, max_area=24 * 40)
    mine = ours(**call, generator=gen(2)).images
    assert torch.equal(mine, stock(**call, generator=gen(2)).images)


# -- the reference ------------------------------------------------------------------------------------------------


def covers_of(entities) -> list[list[bool]]:
    """The oracle's token cover of each entity's box, then every reference token (covered by every entity)."""
    return [oracles.token_cover(e.rasterize(W, H), H, W, 2, 2) + [True] * N_REF for e in entities]


def masked_attention(q, k, v, rope, mask):
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


class ReferenceProcessor:
    """FLUX's attention written out: text first in double-stream blocks, the whole stream in single-stream ones."""

    def __init__(self, mask):
        self.mask = mask  # applies to the sequence of its length; any other (a negative branch's) is unmasked

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        q, k = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        text = encoder_hidden_states
        if text is not None:
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), q], 1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), k], 1)
            v = torch.cat([heads(attn.add_v_proj(text)), v], 1)
        out = masked_attention(q, k, v, image_rotary_emb, self.mask if self.mask.shape[-1] == q.shape[1] else None)
        if text is None:
            return out
        return attn.to_out[1](attn.to_out[0](out[:, text.shape[1]:])), attn.to_add_out(out[:, :text.shape[1]])


def reference_run(stock, entities, seed, **call):
    segments = [stock._get_t5_prompt_embeds(e.prompt, max_sequence_length=MSL) for e in entities]
    embeds, pooled, _ = stock.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=MSL)
    segments.append(embeds)
    mask = reference_mask_segments(covers_of(entities), [MSL] * len(entities), MSL, N_IMG + N_REF)
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor(ReferenceProcessor(mask))
    try:
        return stock(**kwargs(prompt=None, prompt_embeds=torch.cat(segments, dim=1), pooled_prompt_embeds=pooled,
                              **call), generator=gen(seed)).images
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
    """True CFG: the negative branch runs its prompt without entities and without a mask (section 2)."""
    ours, stock = pipes
    cfg = {"true_cfg_scale": 2.5, "negative_prompt": "blurry"}
    mine = ours(**kwargs(**cfg), entities=ENTITIES, keep_outside=False, generator=gen(8)).images
    expected = reference_run(stock, ENTITIES, 8, **cfg)
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)


def test_reference_tokens_are_seen_by_entity_text(pipes):
    """The decision of section 21: with the reference tokens hidden from the entity texts the result differs."""
    ours, stock = pipes
    mine = ours(**kwargs(), entities=ENTITIES, keep_outside=False, generator=gen(5)).images
    hidden = [c[:N_IMG] + [False] * N_REF for c in covers_of(ENTITIES)]
    mask = reference_mask_segments(hidden, [MSL] * 2, MSL, N_IMG + N_REF)
    segments = [stock._get_t5_prompt_embeds(e.prompt, max_sequence_length=MSL) for e in ENTITIES]
    embeds, pooled, _ = stock.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=MSL)
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor(ReferenceProcessor(mask))
    try:
        other = stock(**kwargs(prompt=None, prompt_embeds=torch.cat([*segments, embeds], 1),
                               pooled_prompt_embeds=pooled), generator=gen(5)).images
    finally:
        stock.transformer.set_attn_processor(originals)
    assert (mine - other).abs().max() > 1e-4


# -- locality and keep-outside ------------------------------------------------------------------------------------


def cover_tokens(entity) -> torch.Tensor:
    return torch.tensor(oracles.token_cover(entity.rasterize(W, H), H, W, 2, 2))


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
def test_an_entity_instruction_moves_only_the_tokens_it_covers(dirs, attention):
    pipe = load(EliGenFluxKontextPipeline, dirs["one"])
    assert len(pipe.transformer.transformer_blocks) == 1 and len(pipe.transformer.single_transformer_blocks) == 0

    def one_step(first_prompt):
        entities = [Entity(first_prompt, box=ENTITIES[0].box), ENTITIES[1]]
        return pipe(**kwargs(num_inference_steps=1), entities=entities, keep_outside=False, attention=attention,
                    generator=gen(6)).images[0]

    base, changed = one_step("a dog"), one_step("a green tree")
    moved = (base - changed).abs().amax(dim=-1) > 0
    inside = cover_tokens(ENTITIES[0])
    assert not moved[~inside].any() and moved[inside].any()


def test_keep_outside_leaves_the_input_outside_the_union(pipes):
    ours, _ = pipes
    square = Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8))
    call = kwargs(image=square, height=None, width=None)
    out = ours(**call, entities=ENTITIES, generator=gen(7)).images
    z_init = ours.encode_image_latents(np.array(square), out.device, out.dtype)[0]
    outside = ~(cover_tokens(ENTITIES[0]) | cover_tokens(ENTITIES[1]))
    assert torch.equal(out[0][outside], z_init[outside])
    assert (out[0][~outside] - z_init[~outside]).abs().max() > 1e-3
    free = ours(**call, entities=ENTITIES, keep_outside=False, generator=gen(7)).images
    assert (free[0][outside] - z_init[outside]).abs().max() > 1e-3  # off: the model may touch everything
    pixels = np.asarray(ours(**kwargs(image=square, height=None, width=None, output_type="pil"), entities=ENTITIES,
                             generator=gen(7)).images[0])
    union = np.zeros((32, 32), bool)
    for e in ENTITIES:
        union |= e.rasterize(32, 32)
    assert np.array_equal(pixels[~union], np.asarray(square)[~union])  # pasted back


# -- eligen edit --------------------------------------------------------------------------------------------------


def test_cli_edit_end_to_end(dirs, tmp_path, capsys):
    import json

    from eligen.cli import main
    from eligen.families.flux.testing import save_tiny_pipeline
    from eligen.generate import read_metadata

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "seed": 3,
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]},
                                               {"prompt": "a blue square", "box": [16, 12, 30, 30]}]}))
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    fast = ["--steps", "2", "--max-sequence-length", str(MSL), "--no-auto-resize"]
    out = tmp_path / "edited.png"
    assert main(["edit", str(photo), str(layout), "-o", str(out), "--model", str(dirs["full"]), *fast]) == 0
    record = read_metadata(out)
    assert record["command"] == "edit" and record["params"]["keep_outside"] is True
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(out))
    assert after.shape == before.shape
    union = np.zeros((H, W), bool)
    for box in ([2, 2, 14, 10], [16, 12, 30, 30]):
        union |= Entity("x", box=tuple(box)).rasterize(W, H)
    assert np.array_equal(before[~union], after[~union]) and not np.array_equal(before[union], after[union])
    again = tmp_path / "again.png"
    assert main(["edit", "--from", str(out), "-o", str(again)]) == 0
    assert np.array_equal(after, np.asarray(Image.open(again)))
    free = tmp_path / "free.png"
    assert main(["edit", str(photo), str(layout), "-o", str(free), "--model", str(dirs["full"]), *fast,
                 "--no-keep-outside"]) == 0
    assert np.asarray(Image.open(free)).shape == before.shape  # the layout's size, not the model's 1024x1024
    assert not np.array_equal(before[~union], np.asarray(Image.open(free))[~union])
    capsys.readouterr()
    flux = save_tiny_pipeline(tmp_path / "flux")
    assert main(["edit", str(photo), str(layout), "-o", str(tmp_path / "no.png"), "--model", str(flux), *fast]) == 2
    assert "not an edit model" in capsys.readouterr().err
    assert main(["inpaint", "--from", str(out), "-o", str(tmp_path / "x.png")]) == 2
    assert "eligen edit --from" in capsys.readouterr().err
    sized = tmp_path / "sized.json"
    sized.write_text(json.dumps({"prompt": PROMPT, "width": W, "height": H, "entities": []}))
    for command in (["generate", str(sized)], ["inpaint", str(photo), str(layout)]):  # an edit model only edits
        assert main([*command, "-o", str(tmp_path / "no.png"), "--model", str(dirs["full"]), "--steps", "1"]) == 2
        assert "is a FLUX.1 Kontext model, an edit model; edit with it" in capsys.readouterr().err
