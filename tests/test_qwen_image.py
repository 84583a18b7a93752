"""EliGenQwenImagePipeline on the tiny random Qwen-Image (docs/design.md section 11).

The tiny pipeline has VAE scale factor 2: a 32x48 image has an 8x12 token grid (n_img = 96). The reference here
is written from the rules: each prompt encoded alone (true lengths), ``[e_1 | ... | e_N | global | image]``, text
RoPE restarting at the global prompt's offset for every segment, the mask built element by element, attention as
an explicit masked softmax; stock QwenImagePipeline runs the loop around it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from eligen import EliGenQwenImagePipeline, Entity
from eligen.families.base import rescaled_cfg
from eligen.inpaint import plain_cfg
from families import oracles
from reference import reference_mask_segments

H, W = 32, 48
N_IMG = (H // 4) * (W // 4)
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
ENTITIES = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a cat on a red background", box=(20, 12, 46, 30))]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe(tiny_qwen_dir):
    p = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def stock(tiny_qwen_dir):
    p = QwenImagePipeline.from_pretrained(tiny_qwen_dir)
    p.set_progress_bar_config(disable=True)
    return p


def kwargs(**overrides):
    base = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=3, output_type="latent")
    base.update(overrides)
    return base


# -- zero entities: stock QwenImagePipeline ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [{}, {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}])
@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_zero_entities_equal_stock(pipe, stock, cfg, output_type):
    ours = pipe(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_cfg_combinations():
    g = gen(2)
    pos, neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    combined = neg + 4.0 * (pos - neg)
    torch.testing.assert_close(plain_cfg(pos, neg, 4.0), combined)
    expected = combined * (pos.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(rescaled_cfg(pos, neg, 4.0), expected)


# -- the reference ----------------------------------------------------------------------------------------------


def covers_of(entities, height=H, width=W) -> list[list[bool]]:
    """The oracle's token cover of each entity's box (VAE scale factor 2, 2x2 patches)."""
    return [oracles.token_cover(e.rasterize(width, height), height, width, 2, 2) for e in entities]


class ReferenceProcessor:
    """Joint attention of one Qwen-Image block written out: per-segment text RoPE from the rope table, the
    element-wise mask, an explicit masked softmax. Applies to the sequence whose text length is ``regional_len``;
    other sequences (the plain negative branch) get ordinary attention with ordinary positions."""

    def __init__(self, pos_freqs, offset, lengths, mask):
        self.pos_freqs, self.offset, self.lengths, self.mask = pos_freqs, offset, lengths, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        heads, text_len = attn.heads, encoder_hidden_states.shape[1]
        regional = text_len == sum(self.lengths)
        lengths = self.lengths if regional else [text_len]
        positions = [self.offset + j for n in lengths for j in range(n)]
        img_freqs, _ = image_rotary_emb
        txt_freqs = self.pos_freqs[positions]

        def project(x, proj, norm, freqs):
            y = proj(x).unflatten(-1, (heads, -1))
            return apply_rotary_emb_qwen(norm(y), freqs, use_real=False) if freqs is not None else y

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
    """Stock QwenImagePipeline on the full text sequence with :class:`ReferenceProcessor` in every block."""
    segments = [stock._get_qwen_prompt_embeds(e.prompt)[0] for e in entities]
    global_embeds = stock._get_qwen_prompt_embeds(PROMPT)[0]
    lengths = [s.shape[1] for s in segments] + [global_embeds.shape[1]]
    assert len(set(lengths[:-1])) > 1  # the segments really have different lengths
    context = torch.cat([*segments, global_embeds], dim=1)
    mask = reference_mask_segments(covers_of(entities), lengths[:-1], lengths[-1], N_IMG)
    rope = stock.transformer.pos_embed
    offset = max(H // 4 // 2, W // 4 // 2)  # scale_rope: text starts after the largest half-side of the grid
    processor = ReferenceProcessor(rope.pos_freqs, offset, lengths, mask)
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor(processor)
    try:
        negative = {}
        if "negative_prompt" in call:
            negative = {"negative_prompt_embeds": stock._get_qwen_prompt_embeds(call.pop("negative_prompt"))[0]}
            assert negative["negative_prompt_embeds"].shape[1] != context.shape[1]
        return stock(**kwargs(prompt=None, prompt_embeds=context, **negative, **call), generator=gen(seed)).images
    finally:
        stock.transformer.set_attn_processor(originals)


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
@pytest.mark.parametrize("cfg", [{}, {"negative_prompt": NEGATIVE, "true_cfg_scale": 4.0}])
def test_entities_equal_the_reference(pipe, stock, attention, cfg):
    ours = pipe(**kwargs(**cfg), entities=ENTITIES, attention=attention, generator=gen(3)).images
    expected = reference_run(stock, ENTITIES, 3, **cfg)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    plain = pipe(**kwargs(**cfg), generator=gen(3)).images
    assert (ours - plain).abs().max() > 1e-3  # the entities matter


def test_segments_are_unpadded_and_positions_restart(pipe):
    seen = {}
    original = pipe._velocity

    def spy(latents, timestep, branch, geometry, guidance):
        seen.setdefault("cond", branch)
        return original(latents, timestep, branch, geometry, guidance)

    pipe._velocity = spy
    try:
        pipe(**kwargs(num_inference_steps=1), entities=ENTITIES, generator=gen(0))
    finally:
        del pipe._velocity
    branch = seen["cond"]
    lengths = [pipe._get_qwen_prompt_embeds(p)[0].shape[1] for p in [e.prompt for e in ENTITIES] + [PROMPT]]
    assert branch.context.shape[1] == sum(lengths)
    assert branch.positions.tolist() == [j for n in lengths for j in range(n)]
    assert branch.text_mask is None


def test_plain_cfg_mode_differs_from_rescaled(pipe):
    call = kwargs(negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    rescaled = pipe(**call, entities=ENTITIES, generator=gen(4)).images
    plain = pipe(**call, entities=ENTITIES, cfg_mode="plain", generator=gen(4)).images
    assert torch.equal(rescaled, pipe(**call, entities=ENTITIES, cfg_mode="rescaled", generator=gen(4)).images)
    assert (plain - rescaled).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cfg_mode"):
        pipe(**call, entities=ENTITIES, cfg_mode="norm", generator=gen(4))


def test_entities_on_negative_uses_the_negative_prompt_in_every_slot(pipe):
    call = kwargs(negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    off = pipe(**call, entities=ENTITIES, generator=gen(5)).images
    on = pipe(**call, entities=ENTITIES, entities_on_negative=True, generator=gen(5)).images
    assert (on - off).abs().max() > 1e-4
    for attention in ("flex", "segmented"):
        other = pipe(**call, entities=ENTITIES, entities_on_negative=True, attention=attention, generator=gen(5))
        torch.testing.assert_close(other.images, on, atol=1e-5, rtol=1e-5)


def test_flux_checkpoint_is_refused_by_the_qwen_pipeline(tiny_pipeline_dir, tiny_qwen_dir):
    from eligen import EliGenPipeline

    with pytest.raises(ValueError, match="EliGenPipeline"):
        EliGenQwenImagePipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="EliGenQwenImagePipeline"):
        EliGenPipeline.from_pretrained(tiny_qwen_dir)


# -- inpainting -------------------------------------------------------------------------------------------------


def test_inpainting_keeps_latents_outside_the_union(pipe):
    rgb = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    z_init = pipe.encode_image_latents(rgb, torch.device("cpu"), torch.float32)
    out = pipe(**kwargs(negative_prompt=NEGATIVE, true_cfg_scale=4.0), entities=ENTITIES, image=rgb, inpaint=True,
               generator=gen(6)).images
    tokens = torch.tensor(covers_of(ENTITIES)).any(dim=0)  # a token is inside if any of its latent pixels is
    outside = ~tokens
    assert outside.any() and tokens.any()
    assert (out - z_init)[0, outside].abs().max() <= 1e-6
    assert (out - z_init)[0, tokens].abs().max() > 1e-2
    image = pipe(**kwargs(output_type="np"), entities=ENTITIES, image=rgb, inpaint=True, generator=gen(6)).images
    union = np.zeros((H, W), dtype=bool)
    for e in ENTITIES:
        union |= e.rasterize(W, H)
    assert np.array_equal((image[0] * 255).round().astype(np.uint8)[~union], rgb[~union])  # pasted back


def test_vae_round_trip_uses_the_latent_statistics(pipe):
    """encode_image then decode is the VAE's own round trip: the mean/std normalisation cancels."""
    rgb = (np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8)
    packed = pipe.encode_image_latents(rgb, torch.device("cpu"), torch.float32)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        direct = pipe.vae.decode(pipe.vae.encode(pixels[:, :, None]).latent_dist.mode(), return_dict=False)[0][:, :, 0]
        ours = pipe.family.decode(pipe, packed, H, W)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    mean = torch.tensor(pipe.vae.config.latents_mean)
    assert mean.abs().max() > 0  # the statistics are not trivial


# -- LoRA ---------------------------------------------------------------------------------------------------------


def reference_lora(transformer, rank: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    """A random LoRA in the released Qwen-Image-EliGen form: peft names with ``.default``, no prefix, no alpha."""
    from eligen.families.qwen_image.model import QWEN_IMAGE

    g = gen(seed)
    state = {}
    modules = dict(transformer.named_modules())
    for name in QWEN_IMAGE.lora_train_names(transformer):
        layer = modules[name]
        state[f"{name}.lora_A.default.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        state[f"{name}.lora_B.default.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    return state


def test_reference_format_lora_equals_a_hand_merge(pipe, tiny_qwen_dir, tmp_path):
    from safetensors.torch import save_file

    lora_pipe = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    merged = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    for p in (lora_pipe, merged):
        p.set_progress_bar_config(disable=True)
    state = reference_lora(lora_pipe.transformer)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert lora_pipe.load_eligen_lora(tmp_path) == "diffsynth"
    modules = dict(merged.transformer.named_modules())
    with torch.no_grad():
        for key, down in state.items():
            if ".lora_A." in key:
                name = key.removesuffix(".lora_A.default.weight")
                modules[name].weight += state[f"{name}.lora_B.default.weight"] @ down  # no alpha: scale 1
    call = kwargs(negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    ours = lora_pipe(**call, entities=ENTITIES, generator=gen(8)).images
    expected = merged(**call, entities=ENTITIES, generator=gen(8)).images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert (ours - pipe(**call, entities=ENTITIES, generator=gen(8)).images).abs().max() > 1e-3  # no LoRA


def test_a_flux_lora_is_refused_naming_the_families(pipe, random_lora_file):
    from eligen.lora import LoraFormatError

    with pytest.raises(LoraFormatError, match="FLUX"):
        pipe.load_eligen_lora(random_lora_file)


# -- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_generate_inpaint_and_data_generate_on_qwen(tiny_qwen_dir, tmp_path, capsys):
    import json

    from PIL import Image

    from eligen.cli import main
    from eligen.generate import read_metadata

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": W, "height": H, "seed": 3,
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]},
                                               {"prompt": "a cat", "box": [20, 12, 46, 30]}]}))
    fast = ["--model", str(tiny_qwen_dir), "--steps", "2", "--max-sequence-length", "32", "--true-cfg", "4"]
    assert main(["generate", str(layout), "-o", str(tmp_path / "out.png"), *fast, "--overlay"]) == 0
    meta = read_metadata(tmp_path / "out.png")
    assert meta["params"]["model"] == str(tiny_qwen_dir) and len(meta["layout"]["entities"]) == 2
    assert (tmp_path / "out_overlay.png").exists()
    assert main(["generate", "--from", str(tmp_path / "out.png"), "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "again.png")))
    assert main(["generate", str(layout), "-o", str(tmp_path / "plain.png"), *fast, "--cfg-mode", "plain"]) == 0
    assert read_metadata(tmp_path / "plain.png")["params"]["cfg_mode"] == "plain"
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "out.png")),
                              np.asarray(Image.open(tmp_path / "plain.png")))
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    assert main(["inpaint", str(photo), str(layout), "-o", str(tmp_path / "inpainted.png"), *fast]) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(tmp_path / "inpainted.png"))
    assert np.array_equal(before[:, :2], after[:, :2])  # the left edge lies outside both boxes: untouched
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on a gray background\n")
    assert main(["data", "generate", str(captions), "--model", str(tiny_qwen_dir), "--out", str(tmp_path / "data"),
                 "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 2


def test_an_entity_reference_image_is_refused_by_name(tiny_qwen_dir):
    from eligen.entities import LayoutError

    pipe = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    entity = Entity("a cat", box=[0, 0, 16, 16], image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(LayoutError, match=r"entity 0, field 'image'.*no IP-Adapter"):
        pipe("a cat", entities=[entity], height=32, width=32, num_inference_steps=1)
