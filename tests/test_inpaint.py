"""Inpainting fusion (docs/design.md section 5, paper eqs. 14-19) on the tiny random FLUX.

The tiny pipeline has VAE scale factor 2: one latent pixel = 2x2 pixels, one token = 4x4 pixels. Every reference
here (box rasteriser, NEAREST resize, union, packing, regional mask, dilation) is rebuilt independently with loops
or PIL, never with the package's own helpers. The session-scoped pipeline is never left modified.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from eligen import Entity, LayoutError
from eligen.cli import main
from eligen.generate import overlay_path_for, read_metadata
from reference import reference_mask

H, W = 32, 48  # pixels; latent grid 16x24, token grid 8x12
F_VAE = 2  # the tiny VAE's scale factor
MSL = 16
PROMPT = "a red circle and a blue square"
NEGATIVE = ""
BOX_A = (3, 5, 15, 17)  # odd corners: not aligned to latent pixels or tokens
BOX_B = (22, 10, 41, 27)
BOX_C = (30, 2, 46, 8)
BOX_D = (4, 22, 12, 30)
ENTITIES = [Entity("a dog", box=BOX_A), Entity("a cat", box=BOX_B)]
FAST = dict(max_sequence_length=MSL, guidance_scale=3.5)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_image(height: int = H, width: int = W, seed: int = 0) -> np.ndarray:
    """A structured ``uint8 (H, W, 3)`` input: colour gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([40 + 170 * xs / width, 60 + 150 * ys / height, 120 + 60 * np.sin(xs / 5 + ys / 7)], axis=2)
    image += rng.normal(0, 8, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------------------


def box_pixels(box, height: int, width: int) -> np.ndarray:
    """Pixel-centre rule by loops: pixel (x, y) is in the box iff x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            mask[y, x] = x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
    return mask


def pixel_union(boxes, height: int, width: int) -> np.ndarray:
    union = np.zeros((height, width), dtype=bool)
    for box in boxes:
        union |= box_pixels(box, height, width)
    return union


def latent_union(boxes, height: int, width: int, lat_h: int, lat_w: int) -> np.ndarray:
    """Each box rasterised at the output size, resized NEAREST (PIL) to the latent grid, then the union."""
    union = np.zeros((lat_h, lat_w), dtype=bool)
    for box in boxes:
        image = Image.fromarray(np.where(box_pixels(box, height, width), 255, 0).astype(np.uint8), mode="L")
        union |= np.asarray(image.resize((lat_w, lat_h), Image.Resampling.NEAREST)) >= 128
    return union


def pack_union(union: np.ndarray, channels: int = 4) -> torch.Tensor:
    """``(h, w)`` latent mask -> ``(1, h/2 * w/2, channels * 4)`` float, in ``(h p1)(w p2) -> (h w)(c p1 p2)`` order."""
    lat_h, lat_w = union.shape
    rows = []
    for ty in range(lat_h // 2):
        for tx in range(lat_w // 2):
            row = []
            for _c in range(channels):
                for p1 in range(2):
                    for p2 in range(2):
                        row.append(float(union[2 * ty + p1, 2 * tx + p2]))
            rows.append(row)
    return torch.tensor(rows)[None]


def dilate_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a ``(2 radius + 1)`` square, by loops over the offsets."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = np.zeros_like(mask)
            ys, xs = slice(max(dy, 0), height + min(dy, 0)), slice(max(dx, 0), width + min(dx, 0))
            ys_src, xs_src = slice(max(-dy, 0), height + min(-dy, 0)), slice(max(-dx, 0), width + min(-dx, 0))
            shifted[ys, xs] = mask[ys_src, xs_src]
            out |= shifted
    return out


@torch.no_grad()
def vae_latents(pipe, rgb: np.ndarray) -> torch.Tensor:
    """z_init straight through the VAE: [-1, 1] pixels, latent mode, shift/scale, FluxPipeline._pack_latents."""
    pixels = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    z = pipe.vae.encode(pixels).latent_dist.mode()
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])


def token_covers(boxes, height: int, width: int) -> list[list[bool]]:
    """Per entity: a token is covered if ANY of its 2x2 latent pixels (NEAREST from the pixel mask) is on."""
    lat_h, lat_w = height // F_VAE, width // F_VAE
    covers = []
    for box in boxes:
        latent = latent_union([box], height, width, lat_h, lat_w)
        covers.append([bool(latent[2 * ty:2 * ty + 2, 2 * tx:2 * tx + 2].any())
                       for ty in range(lat_h // 2) for tx in range(lat_w // 2)])
    return covers


def as_uint8(images) -> np.ndarray:
    """The first image of a pipeline output (PIL list or float np) as ``uint8 (H, W, 3)``."""
    first = images[0]
    if isinstance(first, Image.Image):
        return np.asarray(first).copy()
    return np.rint(np.asarray(first) * 255).astype(np.uint8)


def inpaint(pipe, image, entities=ENTITIES, steps: int = 2, seed: int = 0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": steps, "generator": gen(seed), **FAST, **kwargs}
    return pipe(entities=entities, image=image, inpaint=True, **kwargs).images


@contextlib.contextmanager
def count_forwards(pipe):
    """Record ``pipe.transformer.forward`` calls (their timesteps) by wrapping it; restored afterwards."""
    transformer = pipe.transformer
    had_instance_attr = "forward" in transformer.__dict__
    original = transformer.forward
    calls: list[torch.Tensor] = []  # the timestep (t / 1000) of every call

    def counting(*args, **kwargs):
        calls.append(kwargs["timestep"][0].clone())
        return original(*args, **kwargs)

    transformer.forward = counting
    try:
        yield calls
    finally:
        if had_instance_attr:
            transformer.forward = original
        else:
            del transformer.forward


def test_references_are_sane():
    mask = box_pixels((0.6, 1, 3, 2.5), 4, 5)  # centres x in {1.5, 2.5}, y in {1.5}: half-open, like boxes
    assert np.array_equal(np.argwhere(mask), [[1, 1], [1, 2]])
    union = latent_union([BOX_A], H, W, H // 2, W // 2)
    assert union.shape == (16, 24) and 0 < union.sum() < union.size
    packed = pack_union(np.arange(16).reshape(4, 4) % 2 == 1, channels=2)  # columns 1, 3 on
    assert packed.shape == (1, 4, 8)
    assert packed[0, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    dot = np.zeros((5, 6), dtype=bool)
    dot[2, 2] = True
    assert np.array_equal(np.argwhere(dilate_square(dot, 1)), [[y, x] for y in (1, 2, 3) for x in (1, 2, 3)])
    assert dilate_square(dot, 2).sum() == 25 and dilate_square(dot, 3).sum() == 30
    ref = reference_mask([[True, False]], 1, 1, 2)
    assert ref[0, 0].tolist() == [[True, False, True, False], [False, True, True, True],
                                  [True, True, True, True], [False, True, True, True]]


# --------------------------------------------------------------------------------------------------------------
# 1. Exact fusion: latents outside the union end exactly at z_init
# --------------------------------------------------------------------------------------------------------------


OFF_GRID_BOXES = [(3, 5, 15, 17), (18, 9, 31, 27)]  # on a 34x30 image: not a multiple of the patch grid


@pytest.mark.parametrize(("height", "width", "boxes"), [(H, W, [BOX_A, BOX_B]), (30, 34, OFF_GRID_BOXES)])
def test_exact_fusion_keeps_background_latents(tiny_pipe, height, width, boxes):
    rgb = sample_image(height, width)
    work_h, work_w = 4 * round(height / 4), 4 * round(width / 4)  # the patch grid: 4 pixels
    work_rgb = rgb if (work_h, work_w) == (height, width) else np.array(
        Image.fromarray(rgb).resize((work_w, work_h), Image.Resampling.LANCZOS))
    z_init = vae_latents(tiny_pipe, work_rgb)
    torch.testing.assert_close(
        tiny_pipe.encode_image_latents(work_rgb, torch.device("cpu"), torch.float32), z_init, rtol=0, atol=0)

    entities = [Entity(f"thing {i}", box=box) for i, box in enumerate(boxes)]
    out = inpaint(tiny_pipe, rgb, entities, steps=3, negative_prompt=NEGATIVE, true_cfg_scale=3.0,
                  output_type="latent")
    assert out.shape == z_init.shape
    union = pack_union(latent_union(boxes, height, width, work_h // F_VAE, work_w // F_VAE))
    outside, inside = union == 0, union == 1
    assert outside.any() and inside.any()
    assert (out - z_init)[outside].abs().max() <= 1e-6
    assert (out - z_init)[inside].abs().min() > 0  # every inpainted latent moved
    assert (out - z_init)[inside].abs().mean() > 1e-2


@pytest.mark.parametrize(("options", "radius"), [({"mask_dilate": 1}, 1), ({"mask_blur": 0.5}, 2)])
def test_exact_fusion_with_dilation_and_blur(tiny_pipe, options, radius):
    """The fusion union grows by ``mask_dilate`` latent pixels (square) or a blur rim of radius ceil(3 sigma)."""
    rgb = sample_image(seed=9)
    z_init = vae_latents(tiny_pipe, rgb)
    union = latent_union([BOX_A, BOX_B], H, W, H // 2, W // 2)
    grown = dilate_square(union, radius)
    out = inpaint(tiny_pipe, rgb, steps=3, negative_prompt=NEGATIVE, true_cfg_scale=3.0, output_type="latent",
                  **options)
    outside, rim = pack_union(~grown) == 1, pack_union(grown & ~dilate_square(union, radius - 1)) == 1
    assert (out - z_init)[outside].abs().max() <= 1e-6
    moved = (out - z_init)[rim].abs() > 1e-6  # the outermost ring of the grown union is (partly) repainted too
    assert moved.float().mean() > 0.75, moved.float().mean()


# --------------------------------------------------------------------------------------------------------------
# 2. Paper order vs exact order
# --------------------------------------------------------------------------------------------------------------


def test_paper_fusion_equals_exact_without_cfg_and_drifts_with_it(tiny_pipe):
    rgb = sample_image()
    z_init = vae_latents(tiny_pipe, rgb)
    outside = pack_union(latent_union([BOX_A, BOX_B], H, W, H // 2, W // 2)) == 0

    def run(fusion: str, cfg: float):
        return inpaint(tiny_pipe, rgb, steps=3, negative_prompt=NEGATIVE, true_cfg_scale=cfg, fusion=fusion,
                       output_type="latent")

    assert torch.equal(run("paper", 1.0), run("exact", 1.0))
    exact, paper = run("exact", 3.0), run("paper", 3.0)
    assert not torch.equal(exact, paper)
    assert (exact - z_init)[outside].abs().max() <= 1e-6
    assert (paper - z_init)[outside].abs().max() > 1e-3  # the background drifts: why "exact" is the default


# --------------------------------------------------------------------------------------------------------------
# 3. One inpainting step against a manual reimplementation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["exact", "paper"])
def test_one_inpainting_step_matches_manual(tiny_pipe, fusion):
    pipe, cfg, guidance_scale = tiny_pipe, 3.0, 3.5
    boxes = [BOX_A, BOX_B]
    rgb = sample_image(seed=3)
    n_img = (H // 4) * (W // 4)
    z_t = torch.randn((1, n_img, 16), generator=gen(5))
    z_init = vae_latents(pipe, rgb)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=MSL)
        neg_embeds, neg_pooled, _ = pipe.encode_prompt(prompt=NEGATIVE, prompt_2=None, max_sequence_length=MSL)
        entity_embeds = pipe._get_t5_prompt_embeds(prompt=["a dog", "a cat"], max_sequence_length=MSL)
    mask = reference_mask(token_covers(boxes, H, W), MSL, MSL, n_img)
    img_ids = torch.tensor([[0.0, r, c] for r in range(H // 4) for c in range(W // 4)])
    guidance = torch.full((1,), guidance_scale)
    sigma = 1.0  # one step at strength 1: sigma 1 (t = 1000, passed as t / 1000) -> 0

    def velocity(pooled_vec, context, attention_mask):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=z_t, timestep=torch.full((1,), sigma), guidance=guidance, pooled_projections=pooled_vec,
                encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3), img_ids=img_ids,
                joint_attention_kwargs=kwargs, return_dict=False,
            )[0]

    n_f = velocity(pooled, torch.cat([entity_embeds[0:1], entity_embeds[1:2], prompt_embeds], dim=1), mask)
    n_neg = velocity(neg_pooled, neg_embeds, None)
    n_b = (z_t - z_init) / sigma
    union = pack_union(latent_union(boxes, H, W, H // 2, W // 2))
    exact = (n_neg + cfg * (n_f - n_neg)) * union + n_b * (1 - union)
    paper = n_neg + cfg * (n_f * union + n_b * (1 - union) - n_neg)
    expected = {name: z_t + v * (0.0 - sigma) for name, v in (("exact", exact), ("paper", paper))}
    assert (expected["exact"] - expected["paper"]).abs().max() > 1e-3  # the two orders are distinguishable here

    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=cfg, guidance_scale=guidance_scale,
               entities=[Entity("a dog", box=BOX_A), Entity("a cat", box=BOX_B)], image=rgb, inpaint=True,
               fusion=fusion, strength=1.0, height=H, width=W, num_inference_steps=1, max_sequence_length=MSL,
               latents=z_t.clone(), output_type="latent").images
    torch.testing.assert_close(out, expected[fusion], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 4. Paste-back: pixels outside the union come back byte for byte
# --------------------------------------------------------------------------------------------------------------


def rgb_from_16_bit(values: np.ndarray) -> np.ndarray:
    """The documented reduction of a 16-bit gray value to 8 bits: round(v / 257), replicated to RGB."""
    gray = np.rint(values.astype(np.float64) / 257).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def make_input(kind: str, tmp_path: Path):
    """``(what to pass as image, the uint8 RGB it stands for, boxes)``."""
    boxes = [BOX_A, BOX_B]
    if kind == "rgb":
        rgb = sample_image()
        return Image.fromarray(rgb), rgb, boxes
    if kind == "off_grid":  # 34x30 is not a multiple of the 4-pixel patch grid
        rgb = sample_image(30, 34, seed=1)
        return rgb, rgb, OFF_GRID_BOXES
    if kind == "L":
        gray = sample_image(seed=2)[..., 0]
        return Image.fromarray(gray, mode="L"), np.repeat(gray[..., None], 3, axis=2), boxes
    if kind == "RGBA":
        rgb = sample_image(seed=3)
        rgba = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
        return Image.fromarray(rgba, mode="RGBA"), rgb, boxes
    if kind == "I;16":
        values = np.random.default_rng(4).integers(0, 65536, (H, W)).astype(np.uint16)
        values[:, :3] = [[0, 128, 65535]]  # edges of the range, and 128 / 257 rounds down to 0
        path = tmp_path / "gray16.png"
        Image.fromarray(values).save(path)
        with Image.open(path) as opened:
            assert opened.mode.startswith("I")  # a real 16-bit grayscale PNG
            assert np.array_equal(np.asarray(opened).astype(np.int64), values.astype(np.int64))
        return path, rgb_from_16_bit(values), boxes
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["rgb", "off_grid", "L", "RGBA", "I;16"])
def test_paste_back_keeps_unmasked_pixels(tiny_pipe, tmp_path, kind):
    image, rgb, boxes = make_input(kind, tmp_path)
    height, width = rgb.shape[:2]
    entities = [Entity(f"thing {i}", box=box) for i, box in enumerate(boxes)]
    outside = ~pixel_union(boxes, height, width)
    pil = inpaint(tiny_pipe, image, entities, negative_prompt=NEGATIVE, true_cfg_scale=3.0, output_type="pil")
    as_np = inpaint(tiny_pipe, image, entities, negative_prompt=NEGATIVE, true_cfg_scale=3.0, output_type="np")
    assert pil[0].size == (width, height) and pil[0].mode == "RGB"
    assert as_np.shape == (1, height, width, 3)
    for out in (as_uint8(pil), as_uint8(as_np)):
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert np.array_equal(out[outside], rgb[outside])
        assert np.abs(out[~outside].astype(int) - rgb[~outside]).mean() > 1  # the masked region was repainted
    assert np.array_equal(as_uint8(pil), as_uint8(as_np))


def test_paste_back_with_dilation_blur_and_off(tiny_pipe):
    rgb = sample_image(seed=5)
    union = pixel_union([BOX_A, BOX_B], H, W)

    dilated = dilate_square(union, 1 * F_VAE)  # mask_dilate=1 latent pixel = 2 pixels, square element
    out = as_uint8(inpaint(tiny_pipe, rgb, mask_dilate=1))
    assert np.array_equal(out[~dilated], rgb[~dilated])
    outer_ring = dilated & ~dilate_square(union, F_VAE - 1)  # the dilation reaches the paste-back, all 2 pixels
    assert (out[outer_ring] != rgb[outer_ring]).any(axis=-1).mean() > 0.5

    blurred = dilate_square(union, 3)  # mask_blur=0.5 latent px = sigma 1 px: a kernel of radius ceil(3 * 1)
    out = as_uint8(inpaint(tiny_pipe, rgb, mask_blur=0.5))
    assert np.array_equal(out[~blurred], rgb[~blurred])
    second_ring = dilate_square(union, 2) & ~dilate_square(union, 1)  # weight ~0.06 there: enough to move a byte
    assert (out[second_ring] != rgb[second_ring]).any(axis=-1).mean() > 0.5
    generated = as_uint8(inpaint(tiny_pipe, rgb, mask_blur=0.5, paste_back=False))
    assert np.array_equal(out[union], generated[union])  # inside the union the blend weight stays exactly 1

    out = as_uint8(inpaint(tiny_pipe, rgb))
    generated = as_uint8(inpaint(tiny_pipe, rgb, paste_back=False))
    assert np.array_equal(out, np.where(union[..., None], generated, rgb))  # paste-back is exactly a hard select
    assert (generated[~union] != rgb[~union]).any(axis=-1).mean() > 0.5


def test_paste_back_after_resizing_to_a_larger_output(tiny_pipe):
    """height/width of the image's aspect ratio: the input is resized (LANCZOS) and that is what comes back."""
    rgb = sample_image(seed=10)
    box = (6, 10, 30, 34)  # drawn at the 96x64 output
    out = as_uint8(inpaint(tiny_pipe, rgb, [Entity("a dog", box=box)], height=64, width=96))
    assert out.shape == (64, 96, 3)
    expected = np.asarray(Image.fromarray(rgb).resize((96, 64), Image.Resampling.LANCZOS))
    outside = ~pixel_union([box], 64, 96)
    assert np.array_equal(out[outside], expected[outside])


# --------------------------------------------------------------------------------------------------------------
# 5. One forward per step and CFG branch whatever the number of entities; strength
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [False, True])
def test_transformer_calls_do_not_depend_on_entity_count(tiny_pipe, cfg):
    rgb = sample_image()
    boxes = [BOX_A, BOX_B, BOX_C, BOX_D]
    extra = {"negative_prompt": NEGATIVE, "true_cfg_scale": 3.0} if cfg else {}
    for count in (1, 2, 4):
        entities = [Entity(f"thing {i}", box=box) for i, box in enumerate(boxes[:count])]
        with count_forwards(tiny_pipe) as calls:
            inpaint(tiny_pipe, rgb, entities, steps=3, output_type="latent", **extra)
        assert len(calls) == 3 * (2 if cfg else 1), count
    assert "forward" not in tiny_pipe.transformer.__dict__


@pytest.mark.parametrize("cfg", [False, True])
def test_strength_skips_steps_and_stays_closer_to_the_input(tiny_pipe, cfg):
    rgb = sample_image(seed=6)
    z_init = vae_latents(tiny_pipe, rgb)
    inside = pack_union(latent_union([BOX_A, BOX_B], H, W, H // 2, W // 2)) == 1
    extra = {"negative_prompt": NEGATIVE, "true_cfg_scale": 3.0} if cfg else {}
    branches = 2 if cfg else 1
    outputs, timesteps = {}, {}
    for strength in (0.5, 1.0):
        with count_forwards(tiny_pipe) as calls:
            outputs[strength] = inpaint(tiny_pipe, rgb, steps=4, strength=strength, output_type="latent", **extra)
        assert len(calls) == int(4 * strength) * branches
        timesteps[strength] = [float(t) for t in calls[::branches]]
    # strength 0.5 runs the last half of the same schedule
    assert timesteps[0.5] == timesteps[1.0][2:]
    assert timesteps[1.0] == sorted(timesteps[1.0], reverse=True) and timesteps[1.0][0] == 1.0
    # (the random tiny VAE does not reconstruct pixels, so "closer to the input" is measured on its latents)
    distance = {s: (out - z_init)[inside].abs().mean() for s, out in outputs.items()}
    assert distance[0.5] < 0.8 * distance[1.0]
    # a partial schedule still lands the background exactly on the input's latents
    for out in outputs.values():
        assert (out - z_init)[~inside].abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------------------------
# 6. Bad input: clear errors before any denoising
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error", "expected"),
    [
        ({"entities": None}, ValueError, "at least one entity"),
        ({"entities": []}, ValueError, "at least one entity"),
        ({"inpaint": False}, ValueError, "inpaint=True"),
        ({"image": None}, ValueError, "needs the input `image`"),
        ({"height": 32, "width": 32}, ValueError, "another aspect ratio"),
        ({"height": 64, "width": 48}, ValueError, "another aspect ratio"),
        ({"strength": 0.0}, ValueError, "strength must be in (0, 1]"),
        ({"strength": 1.5}, ValueError, "strength must be in (0, 1]"),
        ({"strength": -0.5}, ValueError, "strength must be in (0, 1]"),
        ({"fusion": "foo"}, ValueError, "fusion must be one of"),
        ({"mask_dilate": -1}, ValueError, "mask_dilate"),
        ({"mask_dilate": 1.5}, ValueError, "mask_dilate"),
        ({"mask_blur": -1.0}, ValueError, "mask_blur"),
    ],
)
def test_bad_inpainting_arguments(tiny_pipe, overrides, error, expected):
    kwargs = {"prompt": PROMPT, "entities": ENTITIES, "image": sample_image(), "inpaint": True,
              "num_inference_steps": 2, "max_sequence_length": MSL, "output_type": "latent", **overrides}
    with count_forwards(tiny_pipe) as calls, pytest.raises(error) as info:
        tiny_pipe(**kwargs)
    assert expected in str(info.value)
    assert calls == []


def test_transparent_input_is_refused(tiny_pipe):
    rgba = np.concatenate([sample_image(), np.full((H, W, 1), 255, np.uint8)], axis=2)
    rgba[4, 4, 3] = 0
    for image in (Image.fromarray(rgba, mode="RGBA"), rgba):
        with count_forwards(tiny_pipe) as calls, pytest.raises(ValueError, match="transparent"):
            inpaint(tiny_pipe, image, output_type="latent")
        assert calls == []


@pytest.mark.parametrize("index", [0, 1])
def test_entity_covering_no_token_is_named(tiny_pipe, index):
    # a box inside the image whose pixel centres it misses: an empty mask, so (alone) an empty union
    speck = Entity("a speck", box=(1.2, 1.2, 1.4, 1.4))
    entities = [speck] if index == 0 else [Entity("a dog", box=BOX_A), speck]
    with count_forwards(tiny_pipe) as calls, pytest.raises(LayoutError) as info:
        inpaint(tiny_pipe, sample_image(), entities, output_type="latent")
    assert info.value.entity == index and info.value.field == "box"
    assert f"entity {index}" in str(info.value) and "covers no token" in str(info.value)
    assert calls == []


# --------------------------------------------------------------------------------------------------------------
# 7. `eligen inpaint` end to end
# --------------------------------------------------------------------------------------------------------------

CLI_FAST = ["--steps", "2", "--max-sequence-length", "16"]
CLI_BOXES = [[3, 5, 15, 17], [18, 12, 29, 27]]


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def write_layout(path: Path, scale: float = 1.0, **size) -> Path:
    layout = {"prompt": "a dog and a cat on a lawn", "seed": 3, **size,
              "entities": [{"prompt": "a dog", "box": [v * scale for v in CLI_BOXES[0]]},
                           {"prompt": "a cat", "box": [v * scale for v in CLI_BOXES[1]]}]}
    path.write_text(json.dumps(layout))
    return path


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_inpaint_end_to_end(tmp_path, tiny_pipeline_dir, capsys):
    rgb = sample_image(32, 32, seed=7)
    source = tmp_path / "input.png"
    Image.fromarray(rgb).save(source)
    layout = write_layout(tmp_path / "layout.json")  # no width/height: the input's size
    outside = ~pixel_union(CLI_BOXES, 32, 32)
    model = ["--model", tiny_pipeline_dir]

    out = tmp_path / "out.png"
    assert cli("inpaint", source, layout, "-o", out, *model, *CLI_FAST, "--overlay") == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and out.exists() and overlay_path_for(out).exists()
    base = read_rgb(out)
    assert base.shape == rgb.shape
    assert np.array_equal(base[outside], rgb[outside])
    assert not np.array_equal(base[~outside], rgb[~outside])
    record = read_metadata(out)
    assert record["command"] == "inpaint"
    assert record["layout"]["width"] == 32 and record["layout"]["height"] == 32
    params = record["params"]
    assert params["fusion"] == "exact" and params["strength"] == 1.0 and params["paste_back"] is True
    assert params["mask_dilate"] == 0 and params["mask_blur"] == 0.0 and params["image"] == str(source)

    flags = ["--fusion", "paper", "--strength", "0.5", "--no-paste-back", "--mask-dilate", "1", "--mask-blur", "0.5"]
    changed = tmp_path / "changed.png"
    assert cli("inpaint", source, layout, "-o", changed, *model, *CLI_FAST, *flags) == 0
    params = read_metadata(changed)["params"]
    assert params["fusion"] == "paper" and params["strength"] == 0.5 and params["paste_back"] is False
    assert params["mask_dilate"] == 1 and params["mask_blur"] == 0.5
    assert not np.array_equal(read_rgb(changed), base)
    # no paste-back: even far from the (dilated, blurred) union the pixels are the VAE's, not the input's
    far = ~dilate_square(~outside, 2 + 3)  # dilate 1 latent px = 2 px, then a blur rim of ceil(3 * 1) px
    assert far.sum() > 50
    assert (read_rgb(changed)[far] != rgb[far]).any(axis=-1).mean() > 0.5

    # --from reproduces bit for bit, with no layout file
    layout.unlink()
    for made, name in ((out, "again.png"), (changed, "changed_again.png")):
        again = tmp_path / name
        assert cli("inpaint", "--from", made, "-o", again) == 0
        assert np.array_equal(read_rgb(again), read_rgb(made))
        assert read_metadata(again)["params"] == read_metadata(made)["params"]

    # an inpainting PNG is not a `generate` record
    capsys.readouterr()
    assert cli("generate", "--from", out, "-o", tmp_path / "never.png") == 2
    err = capsys.readouterr().err
    assert "eligen inpaint --from" in err and "Traceback" not in err
    assert not (tmp_path / "never.png").exists()


def test_cli_inpaint_layout_size(tmp_path, tiny_pipeline_dir, capsys):
    rgb = sample_image(32, 32, seed=8)
    source = tmp_path / "input.png"
    Image.fromarray(rgb).save(source)
    model = ["--model", tiny_pipeline_dir]

    other_ratio = write_layout(tmp_path / "wide.json", width=64, height=32)
    never = tmp_path / "never.png"
    assert cli("inpaint", source, other_ratio, "-o", never, *model, *CLI_FAST) == 2
    err = capsys.readouterr().err
    assert "aspect ratio" in err and "64x32" in err and "32x32" in err and "Traceback" not in err
    assert not never.exists()

    doubled = write_layout(tmp_path / "double.json", scale=2.0, width=64, height=64)
    out = tmp_path / "scaled.png"
    assert cli("inpaint", source, doubled, "-o", out, *model, *CLI_FAST) == 0
    result = read_rgb(out)
    assert result.shape == rgb.shape
    record = read_metadata(out)["layout"]
    assert (record["width"], record["height"]) == (32, 32)
    assert [e["box"] for e in record["entities"]] == [[float(v) for v in box] for box in CLI_BOXES]
    outside = ~pixel_union(CLI_BOXES, 32, 32)
    assert np.array_equal(result[outside], rgb[outside])
    assert not np.array_equal(result[~outside], rgb[~outside])


def test_32bit_integer_image_with_8bit_values_is_not_darkened():
    from eligen.inpaint import to_rgb_array

    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="L")
    rgb, _ = to_rgb_array(grey.convert("I"))
    assert np.array_equal(rgb[..., 0], np.asarray(grey))
