"""IP-Adapter with EliGen (docs/design.md section 14): stock numerics without entities, one attention layer against a
reference written here in every attention mode, per-entity reference images, layouts, the CLI and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image

from eligen import EliGenPipeline, Entity
from eligen.cli import main
from eligen.entities import LayoutError, load_layout
from eligen.families.flux.testing import save_tiny_ip_adapter
from eligen.generate import read_metadata
from reference import reference_mask_segments

CALL = dict(prompt="a red circle", height=32, width=48, max_sequence_length=16, output_type="latent")
# Boxes on the 4-pixel token grid of the tiny model (VAE factor 2, 2x2 packing): 12 x 8 tokens.
BOXES = [(0, 0, 16, 16), (24, 8, 48, 32)]


def picture(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def ip_folder(tiny_pipeline_dir, tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(tiny_pipeline_dir, subfolder="transformer")
    folder = tmp_path_factory.mktemp("ip-adapter")
    return save_tiny_ip_adapter(folder, type("Config", (), config)), folder


def with_adapter(cls, tiny_pipeline_dir, ip_folder, scale=0.7):
    pipe = cls.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(**ip_folder[0], image_encoder_dtype=torch.float32)
    pipe.set_ip_adapter_scale(scale)
    return pipe


@pytest.fixture(scope="module")
def ip_pipe(tiny_pipeline_dir, ip_folder):
    return with_adapter(EliGenPipeline, tiny_pipeline_dir, ip_folder)


def cover_of(box, width=48, height=32, token=4) -> torch.Tensor:
    """``(n_img,)`` bool: the tokens inside a grid-aligned box, row-major."""
    x0, y0, x1, y1 = box
    rows, cols = torch.arange(height // token)[:, None], torch.arange(width // token)[None, :]
    return ((rows >= y0 // token) & (rows < y1 // token) & (cols >= x0 // token) & (cols < x1 // token)).flatten()


# ----------------------------------------------------------------------------------------------------------
# 1. No entities: stock FluxPipeline with the same adapter, exactly
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["black-negative", "negative-image", "embeds"])
def test_zero_entities_equal_stock_flux_pipeline(case, ip_pipe, tiny_pipeline_dir, ip_folder):
    from diffusers import FluxPipeline

    stock = with_adapter(FluxPipeline, tiny_pipeline_dir, ip_folder)
    kwargs = dict(CALL, num_inference_steps=2, negative_prompt="blurry", true_cfg_scale=2.5)
    if case == "black-negative":  # true CFG without a negative image: diffusers' black image
        kwargs["ip_adapter_image"] = picture(1)
    elif case == "negative-image":
        kwargs.update(ip_adapter_image=[picture(1)], negative_ip_adapter_image=picture(2), num_images_per_prompt=2)
    else:
        embeds = stock.prepare_ip_adapter_image_embeds(picture(3), None, torch.device("cpu"), 1)
        kwargs.update(ip_adapter_image_embeds=embeds, negative_ip_adapter_image_embeds=[torch.zeros_like(embeds[0])])
    ours = ip_pipe(**kwargs, generator=gen()).images
    assert torch.equal(ours, stock(**kwargs, generator=gen()).images)
    plain = ip_pipe(**{k: v for k, v in kwargs.items() if "ip_adapter" not in k}, generator=gen()).images
    assert not torch.equal(ours, plain)  # the adapter does act


# ----------------------------------------------------------------------------------------------------------
# 2. One attention layer against a reference written from the rules
# ----------------------------------------------------------------------------------------------------------


def project(pipe, image) -> torch.Tensor:
    """The adapter's image tokens of ``image``: CLIP image embedding -> projection, ``(1, 1, T_ip, C)``."""
    pixels = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    embeds = pipe.image_encoder(pixels).image_embeds
    return pipe.transformer.encoder_hid_proj([embeds[:, None]])[0]


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.unflatten(-1, (h, -1))


def sdpa(q, k, v, mask=None) -> torch.Tensor:
    """``(B, L, H, d)`` attention, flattened to ``(B, L, H d)``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def reference_layer(attn, image, text, rope, covers, lengths, ip_global, ip_entities):
    """A FLUX double-stream attention layer under the regional mask, plus the IP branch: unmasked for the global
    reference, restricted to each entity's tokens for its own (``ip_entities``: (tokens, weight (n_img,)))."""
    h, proc = attn.heads, attn.processor
    q = attn.norm_q(heads(attn.to_q(image), h))
    k, v = attn.norm_k(heads(attn.to_k(image), h)), heads(attn.to_v(image), h)
    tq, tk = attn.norm_added_q(heads(attn.add_q_proj(text), h)), attn.norm_added_k(heads(attn.add_k_proj(text), h))
    tv = heads(attn.add_v_proj(text), h)
    query = apply_rotary_emb(torch.cat([tq, q], 1), rope, sequence_dim=1)
    key = apply_rotary_emb(torch.cat([tk, k], 1), rope, sequence_dim=1)
    mask = reference_mask_segments(covers, lengths[:-1], lengths[-1], image.shape[1])
    joint = sdpa(query, key, torch.cat([tv, v], 1), mask)
    text_out, image_out = joint[:, : text.shape[1]], joint[:, text.shape[1]:]

    def ip(tokens):
        ip_k, ip_v = proc.to_k_ip[0](tokens)[:, 0], proc.to_v_ip[0](tokens)[:, 0]
        return proc.scale[0] * sdpa(q, heads(ip_k, h), heads(ip_v, h))

    ip_out = ip(ip_global) + sum(weight[None, :, None] * ip(tokens) for tokens, weight in ip_entities)
    return attn.to_out[0](image_out), attn.to_add_out(text_out), ip_out


def capture_layer(pipe, entities, mode, compiled=False):
    """The first double-stream attention layer's inputs and outputs during one step (true CFG off)."""
    seen = []
    attn = pipe.transformer.transformer_blocks[0].attn
    handle = attn.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True)
    try:
        pipe(**CALL, num_inference_steps=1, entities=entities, ip_adapter_image=picture(1), attention=mode,
             generator=gen())
    finally:
        handle.remove()
    kwargs, out = seen[0]
    if compiled:  # the same layer through torch.compile (fullgraph), on the same inputs
        with torch.no_grad():
            out = torch.compile(attn, backend="eager", fullgraph=True)(**kwargs)
    return kwargs, out


LAYOUT = [Entity("a dog", box=BOXES[0], image=picture(4), image_scale=0.5), Entity("a cat", box=BOXES[1])]


@pytest.mark.parametrize("mode", ["dense", "flex", "segmented", "compiled"])
def test_layer_with_entities_and_ip_adapter_matches_the_reference(mode, ip_pipe):
    kwargs, out = capture_layer(ip_pipe, LAYOUT, "flex" if mode == "compiled" else mode, mode == "compiled")
    covers = [cover_of(b).tolist() for b in BOXES]
    with torch.no_grad():
        expected = reference_layer(
            ip_pipe.transformer.transformer_blocks[0].attn, kwargs["hidden_states"],
            kwargs["encoder_hidden_states"], kwargs["image_rotary_emb"], covers, [16, 16, 16],
            project(ip_pipe, picture(1)), [(project(ip_pipe, picture(4)), 0.5 * cover_of(BOXES[0]).float())])
    assert len(out) == 3
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_compiled_pipeline_equals_eager(tiny_pipeline_dir, ip_folder, ip_pipe):
    pipe = with_adapter(EliGenPipeline, tiny_pipeline_dir, ip_folder)
    pipe.compile_transformer(backend="eager")
    kwargs = dict(CALL, num_inference_steps=2, entities=LAYOUT, ip_adapter_image=picture(1), attention="segmented",
                  negative_prompt="", true_cfg_scale=2.0)
    try:
        torch.testing.assert_close(pipe(**kwargs, generator=gen()).images,
                                   ip_pipe(**{**kwargs, "attention": "dense"}, generator=gen()).images,
                                   atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# 3. A reference image per entity
# ----------------------------------------------------------------------------------------------------------


def test_entity_image_reaches_only_its_tokens_and_scale_zero_is_no_image(ip_pipe):
    kwargs, out = capture_layer(ip_pipe, LAYOUT, "dense")
    attn = ip_pipe.transformer.transformer_blocks[0].attn
    with torch.no_grad():
        without = attn(**{**kwargs, "entity_ip": None})
    inside = cover_of(BOXES[0])
    assert torch.equal(out[0], without[0]) and torch.equal(out[1], without[1])  # the joint attention is untouched
    assert torch.equal(out[2][:, ~inside], without[2][:, ~inside])
    assert (out[2][:, inside] - without[2][:, inside]).abs().amin(dim=-1).gt(0).all()

    call = dict(CALL, num_inference_steps=2, ip_adapter_image=picture(1), negative_prompt="", true_cfg_scale=2.0)
    plain = [Entity("a dog", box=BOXES[0]), LAYOUT[1]]
    zero = [Entity("a dog", box=BOXES[0], image=picture(4), image_scale=0), LAYOUT[1]]
    reference = ip_pipe(**call, entities=plain, generator=gen()).images
    assert torch.equal(ip_pipe(**call, entities=zero, generator=gen()).images, reference)
    assert not torch.equal(ip_pipe(**call, entities=LAYOUT, generator=gen()).images, reference)


# ----------------------------------------------------------------------------------------------------------
# 4. Layout files, PNG metadata and the CLI
# ----------------------------------------------------------------------------------------------------------


def test_layout_images_cli_record_and_reproduction(tmp_path, tiny_pipeline_dir, ip_folder, capsys):
    picture(4).save(tmp_path / "dog.png")
    picture(1).save(tmp_path / "style.png")
    layout = {"prompt": "a red circle", "width": 48, "height": 32, "seed": 3, "ip_adapter_image": "style.png",
              "entities": [{"prompt": "a dog", "box": list(BOXES[0]), "image": "dog.png", "image_scale": 0.5},
                           {"prompt": "a cat", "box": list(BOXES[1])}]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    loaded = load_layout(tmp_path / "layout.json")
    assert loaded.entities[0].image == str(tmp_path / "dog.png") and loaded.entities[0].image_scale == 0.5
    fast = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--max-sequence-length", "16", "--no-progress"]
    out = tmp_path / "out.png"
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(out), *fast, "--ip-adapter",
                 str(ip_folder[1]), "--ip-scale", "0.6"]) == 0
    record = read_metadata(out)
    assert record["params"]["ip_adapter"] == str(ip_folder[1]) and record["params"]["ip_scale"] == 0.6
    assert record["layout"]["ip_adapter_image"].startswith("data:image/png;base64,")
    assert record["layout"]["entities"][0]["image"].startswith("data:image/png;base64,")
    for name in ("dog.png", "style.png"):  # the record is self-contained
        (tmp_path / name).unlink()
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(out), "-o", str(again), "--no-progress"]) == 0
    with Image.open(out) as a, Image.open(again) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    picture(7).save(tmp_path / "other.png")  # --ip-image replaces the layout's global reference
    other = tmp_path / "other_out.png"
    assert main(["generate", "--from", str(out), "-o", str(other), "--no-progress", "--ip-image",
                 str(tmp_path / "other.png")]) == 0
    with Image.open(out) as a, Image.open(other) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert main(["generate", "--from", str(out), "-o", str(tmp_path / "x.png"), "--no-progress",
                 "--model", str(tiny_pipeline_dir), "--ip-adapter", str(tmp_path / "missing")]) == 2
    assert "--ip-adapter" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# 5. Bad input: one clear error naming the field
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_field(ip_pipe, tiny_pipe, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    one_step = dict(CALL, num_inference_steps=1)
    with pytest.raises(LayoutError, match=r"entity 0, field 'image'.*IP-Adapter"):
        tiny_pipe(**one_step, entities=[Entity("a dog", box=BOXES[0], image=picture(4))])
    with pytest.raises(ValueError, match="ip_adapter_image needs an IP-Adapter"):
        tiny_pipe(**one_step, ip_adapter_image=picture(1))
    with pytest.raises(LayoutError, match=r"entity 0, field 'image'.*could not be read"):
        ip_pipe(**one_step, entities=[Entity("a dog", box=BOXES[0], image=str(broken))])
    with pytest.raises(LayoutError, match=r"field 'ip_adapter_image'.*not found"):
        ip_pipe(**one_step, ip_adapter_image=str(tmp_path / "nowhere.png"))
    with pytest.raises(ValueError, match=r"negative_ip_adapter_image holds 2 entries for 1 loaded"):
        ip_pipe(**one_step, ip_adapter_image=picture(1), negative_ip_adapter_image=[picture(2), picture(3)])
    with pytest.raises(LayoutError, match=r"field 'image_scale'"):
        ip_pipe(**one_step, entities=[Entity("a dog", box=BOXES[0], image=picture(4), image_scale=float("nan"))])
    layout = {"prompt": "p", "width": 48, "height": 32, "entities": [{"prompt": "a", "box": [0, 0, 16, 16],
                                                                      "image": "broken.png"}]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "entity 0, field 'image'" in err and "Traceback" not in err
    layout["entities"][0]["image"] = None
    layout["ip_adapter_image"] = "broken.png"
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    picture(1).save(tmp_path / "broken.png")  # readable now, but no --ip-adapter given
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(tmp_path / "o.png")]) == 2
    assert "--ip-adapter" in capsys.readouterr().err


def test_an_adapter_folder_without_its_image_encoder_names_what_to_fetch(tmp_path, tiny_pipeline_dir, ip_folder,
                                                                         capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lone = tmp_path / "adapter"
    lone.mkdir()
    shutil.copy(Path(ip_folder[1]) / ip_folder[0]["weight_name"], lone)  # no image_encoder/ beside it
    code = main(["generate", "examples/tiny_two_shapes.json", "-o", str(tmp_path / "o.png"), "--model",
                 str(tiny_pipeline_dir), "--no-progress", "--ip-adapter", str(lone)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    assert f"cannot load the IP-Adapter (or its CLIP image encoder) {lone}" in err
    assert "hf download openai/clip-vit-large-patch14" in err


@pytest.mark.parametrize("scale", [1e30, -1, float("nan")])
def test_the_api_refuses_an_absurd_adapter_scale_before_loading(tiny_pipeline_dir, ip_folder, scale):
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"the IP-Adapter scale must be a number in 0\.\.100"):
        pipe.load_eligen_ip_adapter(str(ip_folder[1]), scale=scale)
