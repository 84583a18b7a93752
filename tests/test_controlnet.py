"""ControlNet with entities (docs/design.md section 23): stock equality at zero entities, per-entity residuals masked
to the entity's image tokens (against a reference written here), refusals by name, the layout fields and the CLI with
``--from``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eligen import Entity, LayoutError
from eligen.cli import main
from eligen.entities import layout_from_dict, layout_to_dict

SIZE = 32  # pixels: VAE factor 2, 2x2 patches -> an 8x8 token grid
BOX = (0, 0, 16, 32)  # the left half: token columns 0..3


def _control(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def flux_controlnet():
    from eligen.families.flux.testing import build_controlnet

    return build_controlnet(0)


@pytest.fixture(scope="module")
def flux_pipes(tiny_pipeline_dir, flux_controlnet):
    from diffusers import FluxControlNetPipeline

    from eligen.families.flux.controlnet import EliGenFluxControlNetPipeline

    pipes = (FluxControlNetPipeline.from_pretrained(tiny_pipeline_dir, controlnet=flux_controlnet),
             EliGenFluxControlNetPipeline.from_pretrained(tiny_pipeline_dir, controlnet=flux_controlnet))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux_without_entities_is_the_stock_controlnet_pipeline_bit_for_bit(flux_pipes, true_cfg):
    stock, ours = flux_pipes
    call = dict(prompt="a cat", negative_prompt="ugly", true_cfg_scale=true_cfg, height=SIZE, width=SIZE,
                num_inference_steps=2, guidance_scale=3.5, control_image=_control(0),
                controlnet_conditioning_scale=0.7, control_guidance_end=0.5, max_sequence_length=16,
                output_type="latent")
    expected = stock(**call, generator=torch.Generator().manual_seed(1)).images
    got = ours(**call, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(got, expected)


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_qwen_without_entities_is_the_stock_controlnet_pipeline_bit_for_bit(tiny_qwen_dir, true_cfg):
    from diffusers import QwenImageControlNetPipeline

    from eligen.families.qwen_image.controlnet import EliGenQwenImageControlNetPipeline
    from eligen.families.qwen_image.testing import build_controlnet

    net = build_controlnet(0)
    stock = QwenImageControlNetPipeline.from_pretrained(tiny_qwen_dir, controlnet=net)
    ours = EliGenQwenImageControlNetPipeline.from_pretrained(tiny_qwen_dir, controlnet=net)
    call = dict(prompt="a cat", negative_prompt="ugly", true_cfg_scale=true_cfg, height=SIZE, width=SIZE,
                num_inference_steps=2, control_image=_control(0), controlnet_conditioning_scale=0.7,
                max_sequence_length=16, output_type="latent")
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    expected = stock(**call, generator=torch.Generator().manual_seed(1)).images
    got = ours(**call, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(got, expected)
    # an entity's control image runs too (with true CFG and the regional mask)
    entity = Entity("a dog", box=BOX, control_image=_control(1), control_scale=0.5)
    out = ours(**{**call, "control_image": None}, entities=[entity], generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.images).all()


def _first_block_input(pipe, entities, latents, **call):
    """The image tokens entering the second double-stream block (the first block's output plus the first residual)
    at the first step, and every ControlNet call's keyword arguments."""
    seen, calls = [], []
    block = pipe.transformer.transformer_blocks[1]
    hooks = [block.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].clone()),
                                             with_kwargs=True),
             pipe.controlnet.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)]
    try:
        pipe(prompt="a cat", entities=entities, height=SIZE, width=SIZE, num_inference_steps=1,
             max_sequence_length=16, latents=latents, output_type="latent",
             generator=torch.Generator().manual_seed(3), **call)
    finally:
        for hook in hooks:
            hook.remove()
    return seen[0], calls


def test_an_entity_control_image_reaches_only_its_tokens_and_equals_the_masked_residual(flux_pipes):
    """Block 1's input = the plain run's + the global residual everywhere + the entity's residual on its tokens,
    each residual recomputed here from the ControlNet on the global prompt alone."""
    _, pipe = flux_pipes
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(5))
    others = [Entity("a red ball", box=(16, 0, 32, 32))]
    plain, _ = _first_block_input(pipe, [Entity("a dog", box=BOX), *others], latents, control_image=_control(0),
                                  controlnet_conditioning_scale=0.0, guidance_scale=3.5)
    uncontrolled, _ = _first_block_input(pipe, [Entity("a dog", box=BOX), *others], latents, guidance_scale=3.5,
                                         control_image=_control(0), controlnet_conditioning_scale=0.8)
    controlled = [Entity("a dog", box=BOX, control_image=_control(1), control_scale=0.6), *others]
    got, calls = _first_block_input(pipe, controlled, latents, control_image=_control(0), guidance_scale=3.5,
                                    controlnet_conditioning_scale=0.8)
    assert len(calls) == 2  # the global input, then the entity's

    embeds, pooled, text_ids = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=16)

    def residual(call, scale):
        return pipe.controlnet(hidden_states=call["hidden_states"], controlnet_cond=call["controlnet_cond"],
                               conditioning_scale=scale, timestep=call["timestep"], guidance=call["guidance"],
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=call["img_ids"], return_dict=False)[0][0]

    columns = torch.arange(64) % 8  # the 8x8 token grid, row-major
    mask = (columns < 4).float()[None, :, None]
    with torch.no_grad():
        global_only = plain + residual(calls[0], 0.8)
        expected = global_only + mask * residual(calls[1], 0.6)
        zero_global = residual(calls[0], 0.0)
    assert torch.equal(zero_global, torch.zeros_like(zero_global))  # the plain run's global residual is nothing
    assert torch.allclose(got, expected, atol=1e-5)
    outside = mask[0, :, 0] == 0
    assert torch.allclose(uncontrolled, global_only, atol=1e-5)
    assert torch.equal(got[:, outside], uncontrolled[:, outside])  # the entity's residual: nothing outside its mask
    assert (got[:, ~outside] - uncontrolled[:, ~outside]).abs().max() > 1e-3  # and something inside
    as_tensor = torch.from_numpy(np.asarray(_control(1))).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    tensor_entity = [Entity("a dog", box=BOX, control_image=as_tensor, control_scale=0.6), *others]
    again, _ = _first_block_input(pipe, tensor_entity, latents, control_image=_control(0), guidance_scale=3.5,
                                  controlnet_conditioning_scale=0.8)
    assert torch.equal(again, got)  # an entity's control image as a tensor is the same image


def test_qwen_entity_control_reaches_only_its_tokens_with_the_global_prompt_and_its_padding_mask(tiny_qwen_dir):
    """Qwen-Image: true CFG on, the entity's residual (the ControlNet on the global prompt and its padding mask,
    recomputed here) on its tokens only, nothing elsewhere."""
    from eligen.families.qwen_image.controlnet import EliGenQwenImageControlNetPipeline
    from eligen.families.qwen_image.testing import build_controlnet

    pipe = EliGenQwenImageControlNetPipeline.from_pretrained(tiny_qwen_dir, controlnet=build_controlnet(0))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(5))
    call = dict(negative_prompt="ugly", true_cfg_scale=4.0)
    uncontrolled, _ = _first_block_input(pipe, [Entity("a dog", box=BOX)], latents, **call,
                                         control_image=_control(0), controlnet_conditioning_scale=0.0)
    got, calls = _first_block_input(pipe, [Entity("a dog", box=BOX, control_image=_control(1), control_scale=0.6)],
                                    latents, **call)
    assert len(calls) == 1
    embeds, text_mask = pipe.encode_prompt("a cat", max_sequence_length=16)
    with torch.no_grad():
        residual = pipe.controlnet(hidden_states=calls[0]["hidden_states"], controlnet_cond=calls[0]["controlnet_cond"],
                                   conditioning_scale=0.6, timestep=calls[0]["timestep"], encoder_hidden_states=embeds,
                                   encoder_hidden_states_mask=text_mask, img_shapes=calls[0]["img_shapes"],
                                   return_dict=False)[0]
    mask = ((torch.arange(64) % 8) < 4).float()[None, :, None]
    assert torch.allclose(got, uncontrolled + mask * residual, atol=1e-5)
    outside = mask[0, :, 0] == 0
    assert torch.equal(got[:, outside], uncontrolled[:, outside])
    assert (got[:, ~outside] - uncontrolled[:, ~outside]).abs().max() > 1e-3


def test_entity_control_needs_a_controlnet_pipeline_and_one_controlnet(tiny_pipe, flux_pipes, flux_controlnet):
    from diffusers import FluxMultiControlNetModel

    entity = Entity("a dog", box=BOX, control_image=_control(1))
    with pytest.raises(LayoutError, match=r"entity 0, field 'control_image'.*no ControlNet.*FLUX\.1, Qwen-Image"):
        tiny_pipe(prompt="a cat", entities=[entity], height=SIZE, width=SIZE, num_inference_steps=1,
                  max_sequence_length=16, output_type="latent")
    _, pipe = flux_pipes
    with pytest.raises(ValueError, match="needs a control image"):
        pipe(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=1, max_sequence_length=16,
             output_type="latent")
    with pytest.raises(ValueError, match="a control image tensor is 16x16 but the image is 32x32"):
        pipe(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=1, max_sequence_length=16,
             control_image=torch.zeros(1, 3, 16, 16), output_type="latent")
    multi = type(pipe)(**{**pipe.components, "controlnet": FluxMultiControlNetModel([flux_controlnet])})
    with pytest.raises(LayoutError, match="one ControlNet model, not a MultiControlNet"):
        multi(prompt="a cat", entities=[entity], height=SIZE, width=SIZE, num_inference_steps=1,
              max_sequence_length=16, output_type="latent")


def test_layout_fields_are_validated_and_recorded_inline(tmp_path):
    _control(1).save(tmp_path / "pose.png")
    data = {"prompt": "a cat", "width": SIZE, "height": SIZE, "control_image": "pose.png",
            "entities": [{"prompt": "a dog", "box": list(BOX), "control_image": "pose.png", "control_scale": 0.5}]}
    layout = layout_from_dict(data, base_dir=tmp_path)
    record = layout_to_dict(layout, embed_masks=True)
    assert record["entities"][0]["control_image"].startswith("data:image/png;base64,")
    assert record["control_image"].startswith("data:image/png;base64,")
    assert record["entities"][0]["control_scale"] == 0.5
    again = layout_from_dict(json.loads(json.dumps(record)))
    pose = np.asarray(Image.open(tmp_path / "pose.png").convert("RGB"))
    assert np.array_equal(_decoded(again.entities[0].control_image), pose)
    assert np.array_equal(_decoded(again.control_image), pose)
    bad = {**data, "entities": [{**data["entities"][0], "control_scale": -1}]}
    with pytest.raises(LayoutError, match=r"entity 0, field 'control_scale'"):
        layout_from_dict(bad, base_dir=tmp_path)
    bad = {**data, "entities": [{**data["entities"][0], "control_image": "missing.png"}]}
    with pytest.raises(LayoutError, match=r"entity 0, field 'control_image'"):
        layout_from_dict(bad, base_dir=tmp_path)


def _decoded(source: str) -> np.ndarray:
    from eligen.entities import load_reference_image

    return np.asarray(load_reference_image(source))


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, flux_controlnet):
    folder = tmp_path_factory.mktemp("controlnet-cli")
    flux_controlnet.save_pretrained(folder / "controlnet")
    _control(0).save(folder / "edges.png")
    _control(1).save(folder / "pose.png")
    layout = {"prompt": "a cat", "width": SIZE, "height": SIZE, "seed": 7,
              "entities": [{"prompt": "a dog", "box": list(BOX), "control_image": "pose.png", "control_scale": 0.6},
                           {"prompt": "a red ball", "box": [16, 0, 32, 32]}]}
    (folder / "layout.json").write_text(json.dumps(layout))
    return folder


def test_cli_runs_a_controlnet_with_entity_control_and_from_reproduces_it(cli_files, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out.png"
    args = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--no-progress", "--max-sequence-length", "16"]
    assert main(["generate", str(cli_files / "layout.json"), "-o", str(out), *args, "--controlnet",
                 str(cli_files / "controlnet"), "--control-image", str(cli_files / "edges.png"),
                 "--control-scale", "0.8"]) == 0
    record = json.loads(Image.open(out).text["eligen"])
    assert record["params"]["controlnet"] == str(cli_files / "controlnet") and record["params"]["control_scale"] == 0.8
    assert record["layout"]["control_image"].startswith("data:image/")
    assert record["layout"]["entities"][0]["control_image"].startswith("data:image/")
    (cli_files / "pose.png").rename(cli_files / "moved.png")  # the record carries the control images itself
    try:
        again = tmp_path / "again.png"
        assert main(["generate", "--from", str(out), "-o", str(again), "--no-progress"]) == 0
    finally:
        (cli_files / "moved.png").rename(cli_files / "pose.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"  # the control changes the image
    assert main(["generate", str(cli_files / "layout.json"), "-o", str(plain), *args, "--controlnet",
                 str(cli_files / "controlnet"), "--control-image", str(cli_files / "edges.png"),
                 "--control-scale", "0"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


def test_cli_refuses_control_without_a_controlnet_and_a_family_without_one(cli_files, tmp_path, capsys):
    layout = str(cli_files / "layout.json")
    assert main(["generate", layout, "-o", str(tmp_path / "o.png")]) != 0
    assert "entity 0, field 'control_image': a control image needs a ControlNet: pass --controlnet" in \
        capsys.readouterr().err
    krea = tmp_path / "krea2"
    krea.mkdir()
    (krea / "model_index.json").write_text(json.dumps({"_class_name": "Krea2Pipeline"}))
    assert main(["generate", layout, "-o", str(tmp_path / "o.png"), "--model", str(krea), "--controlnet",
                 str(cli_files / "controlnet")]) != 0
    err = capsys.readouterr().err
    assert ("is a Krea 2 model, and eligen runs no ControlNet on it; ControlNet runs on FLUX.1, Qwen-Image, "
            "Z-Image") in err
    assert "Traceback" not in err


def test_a_saved_controlnet_pipeline_is_its_own_card_and_runs_entity_control_from_the_cli(cli_files, tmp_path):
    """A FluxControlNetPipeline folder (the ControlNet saved inside) is the ControlNet variant's checkpoint: the CLI
    loads it with its ControlNet and needs no --controlnet."""
    from eligen.families import card, model_card
    from eligen.families.flux.testing import save_tiny_controlnet_pipeline

    folder = save_tiny_controlnet_pipeline(tmp_path / "cn-pipe")
    assert model_card(folder) is card("flux").variants[1] and "controlnet" in model_card(folder).features
    out = tmp_path / "out.png"
    assert main(["generate", str(cli_files / "layout.json"), "-o", str(out), "--model", str(folder), "--steps", "1",
                 "--no-progress", "--max-sequence-length", "16"]) == 0
    assert Image.open(out).size == (SIZE, SIZE)


def test_entity_control_with_inpainting_and_every_attention_form(flux_pipes):
    """Inpainting keeps the input outside the entity union with a ControlNet too; the attention form does not touch
    the residuals (segmented and flex equal dense)."""
    _, pipe = flux_pipes
    source = _control(7)
    entity = Entity("a dog", box=BOX, control_image=_control(1), control_scale=0.6)
    call = dict(prompt="a cat", entities=[entity], image=source, inpaint=True, height=SIZE, width=SIZE,
                num_inference_steps=2, guidance_scale=3.5, max_sequence_length=16, control_image=_control(0),
                output_type="np")
    dense = pipe(**call, attention="dense", generator=torch.Generator().manual_seed(2)).images[0]
    kept = np.asarray(source)[:, 16:]
    assert np.array_equal(np.round(dense[:, 16:] * 255).astype(np.uint8), kept)
    for form in ("segmented", "flex"):
        other = pipe(**call, attention=form, generator=torch.Generator().manual_seed(2)).images[0]
        assert np.abs(other - dense).max() < 1e-4, form


# -- Z-Image: per-layer hints over the unified stream ---------------------------------------------------------------

@pytest.fixture(scope="module")
def z_image_pipes():
    from diffusers import ZImageControlNetPipeline

    from eligen.families.z_image.controlnet import EliGenZImageControlNetPipeline
    from eligen.families.z_image.testing import build_components, build_controlnet

    stock = ZImageControlNetPipeline(**build_components(0), controlnet=build_controlnet(0))
    pipes = (stock, EliGenZImageControlNetPipeline(**stock.components))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_z_image_without_entities_is_the_stock_controlnet_pipeline_bit_for_bit(z_image_pipes, guidance):
    stock, ours = z_image_pipes
    call = dict(prompt="a cat", negative_prompt="ugly", guidance_scale=guidance, height=SIZE, width=SIZE,
                num_inference_steps=2, control_image=_control(0), controlnet_conditioning_scale=0.7,
                max_sequence_length=16, output_type="latent")
    expected = stock(**call, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(ours(**call, generator=torch.Generator().manual_seed(1)).images, expected)
    if guidance:
        return
    # the hints change the image, and a guidance window that excludes every step is scale 0
    off = stock(**{**call, "controlnet_conditioning_scale": 0.0}, generator=torch.Generator().manual_seed(1)).images
    assert (off - expected).abs().max() > 1e-3
    outside = ours(**call, control_guidance_start=1.0, generator=torch.Generator().manual_seed(1)).images
    assert torch.equal(outside, off)


def _z_image_layer_input(pipe, entities, latents, **call):
    """The unified stream entering main layer 1 (layer 0's output plus the first hints) at the first step, and every
    ControlNet call's positional arguments ``(latents, time, captions, control)``."""
    seen, calls = [], []
    hooks = [pipe.transformer.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())),
             pipe.controlnet.register_forward_pre_hook(lambda m, a: calls.append(a))]
    try:
        pipe(**{"guidance_scale": 0.0, **call}, prompt="a cat", entities=entities, height=SIZE, width=SIZE,
             num_inference_steps=1, max_sequence_length=16, latents=latents, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    return seen[0], calls


def test_z_image_entity_control_reaches_only_its_image_tokens_and_equals_the_masked_hints(z_image_pipes):
    """Layer 1's input over ``[entity | global | image]`` = the plain run's + the global hints on the global prompt's
    and every image token + the entity's hints on its image tokens only, each recomputed here from the ControlNet
    on a separately encoded global prompt."""
    _, pipe = z_image_pipes
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    plain, _ = _z_image_layer_input(pipe, [Entity("a dog", box=BOX)], latents, control_image=_control(0),
                                    controlnet_conditioning_scale=0.0)
    uncontrolled, _ = _z_image_layer_input(pipe, [Entity("a dog", box=BOX)], latents, control_image=_control(0),
                                           controlnet_conditioning_scale=0.8)
    entity = Entity("a dog", box=BOX, control_image=_control(1), control_scale=0.6)
    got, calls = _z_image_layer_input(pipe, [entity], latents, control_image=_control(0),
                                      controlnet_conditioning_scale=0.8)
    assert len(calls) == 2  # the global input, then the entity's
    caption = pipe._encode_prompt(["a cat"], device=torch.device("cpu"), max_sequence_length=16)
    with torch.no_grad():
        hint_global, hint_entity = (pipe.controlnet(call[0], call[1], caption, call[3], conditioning_scale=scale)[0]
                                    for call, scale in ((calls[0], 0.8), (calls[1], 0.6)))
    n_img = 64
    text = got.shape[1] - n_img  # [entity, padded | global, padded]
    caption_len = hint_global.shape[1] - n_img  # the ControlNet's [image | global, padded]
    entity_len = text - caption_len
    assert entity_len > 0 and entity_len % 32 == 0
    expected_global = torch.cat([torch.zeros_like(hint_global[:, :entity_len]), hint_global[:, n_img:],
                                 hint_global[:, :n_img]], dim=1)
    assert torch.allclose(uncontrolled, plain + expected_global, atol=1e-5)
    mask = ((torch.arange(n_img) % 8) < 4).float()[None, :, None]
    assert torch.allclose(got[:, text:], uncontrolled[:, text:] + mask * hint_entity[:, :n_img], atol=1e-5)
    outside = torch.cat([torch.ones(text, dtype=torch.bool), mask[0, :, 0] == 0])
    assert torch.equal(got[:, outside], uncontrolled[:, outside])  # no text token, no image token outside the mask
    assert (got[:, ~outside] - uncontrolled[:, ~outside]).abs().max() > 1e-3
    # under CFG each branch's ControlNet reads that branch's global prompt: the negative one the negative prompt
    _, calls = _z_image_layer_input(pipe, [entity], latents, control_image=_control(0), guidance_scale=2.0,
                                    negative_prompt="ugly")
    negative = pipe._encode_prompt(["ugly"], device=torch.device("cpu"), max_sequence_length=16)
    assert len(calls) == 4 and [len(c[2]) for c in calls] == [1, 1, 1, 1]
    assert torch.equal(calls[0][2][0], caption[0]) and torch.equal(calls[2][2][0], negative[0])


def test_cli_runs_a_z_image_controlnet_with_entity_control(cli_files, tmp_path):
    from eligen.families.z_image.testing import save_tiny_controlnet, save_tiny_pipeline

    model, net = save_tiny_pipeline(tmp_path / "z-image"), save_tiny_controlnet(tmp_path / "z-controlnet")
    out = tmp_path / "out.png"
    args = [str(cli_files / "layout.json"), "--model", str(model), "--steps", "2", "--true-cfg", "2", "--no-progress",
            "--max-sequence-length", "16", "--controlnet", str(net), "--control-image", str(cli_files / "edges.png")]
    assert main(["generate", *args, "-o", str(out), "--control-scale", "0.8"]) == 0
    record = json.loads(Image.open(out).text["eligen"])
    assert record["params"]["controlnet"] == str(net) and record["params"]["control_scale"] == 0.8
    assert record["layout"]["entities"][0]["control_image"].startswith("data:image/")
    plain = tmp_path / "plain.png"
    assert main(["generate", *args, "-o", str(plain), "--control-scale", "0"]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
