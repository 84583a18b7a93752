"""A style LoRA stacked on the EliGen LoRA (the README's example): two adapters, each at its own scale, both on the
same layers, through the CLI's loader and the CLI itself; each scale reaches the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eligen import EliGenPipeline
from eligen.cli import main
from eligen.generate import load_pipeline, read_metadata
from eligen.lora import load_state_dict, read_lora
from eligen.models import TINY_MODEL_DIR
from reference import read_deltas

ELIGEN_LORA = TINY_MODEL_DIR / "eligen_lora.safetensors"
# The style LoRA adapts layers the EliGen LoRA adapts too, and one it leaves alone.
STYLE_LAYERS = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "proj_out")


@pytest.fixture(scope="module")
def base():
    return EliGenPipeline.from_pretrained("eligen-tiny", load_default_lora=False)


@pytest.fixture(scope="module")
def style_lora(base, tmp_path_factory):
    """A random diffusers-format (peft) "style" LoRA of rank 3 for the shipped tiny model."""
    modules, g, state = dict(base.transformer.named_modules()), torch.Generator().manual_seed(11), {}
    for name in STYLE_LAYERS:
        layer = modules[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(3, layer.in_features, generator=g) * 0.3
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 3, generator=g) * 0.3
    path = tmp_path_factory.mktemp("style") / "style.safetensors"
    save_file(state, str(path))
    return path


def test_each_adapter_scale_reaches_the_weights(base, style_lora):
    pipe = load_pipeline("eligen-tiny", "cpu", "float32", [str(ELIGEN_LORA), str(style_lora)], [0.8, 0.5])
    assert sorted(pipe.get_active_adapters()) == ["lora_0", "lora_1"]
    eligen = read_deltas(read_lora(load_state_dict(ELIGEN_LORA))[0])
    style = read_deltas(read_lora(load_state_dict(style_lora))[0])
    assert set(STYLE_LAYERS) - set(eligen) and set(STYLE_LAYERS) & set(eligen)  # shared layers and a style-only one
    stacked, plain = dict(pipe.transformer.named_modules()), dict(base.transformer.named_modules())
    g = torch.Generator().manual_seed(0)
    for name in sorted(set(STYLE_LAYERS) | set(list(eligen)[:4])):
        x = torch.randn(3, plain[name].in_features, generator=g)
        delta = 0.8 * eligen.get(name, 0) + 0.5 * style.get(name, 0)
        with torch.no_grad():
            want = plain[name](x).double() + x.double() @ torch.as_tensor(delta).T
            torch.testing.assert_close(stacked[name](x).double(), want, atol=1e-5, rtol=1e-5, msg=name)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_cli_stacks_a_style_lora_on_the_eligen_lora(style_lora, tmp_path):
    layout = TINY_MODEL_DIR.parents[3] / "examples" / "tiny_two_shapes.json"
    fast = [str(layout), "--steps", "2", "--no-progress", "--lora", str(ELIGEN_LORA), "--lora-scale", "1.0",
            "--lora", str(style_lora), "--lora-scale"]
    images = {}
    for scale in ("0.0", "0.7"):
        out = tmp_path / f"style_{scale}.png"
        assert main(["generate", *fast, scale, "-o", str(out)]) == 0
        images[scale] = pixels(out)
    assert np.abs(images["0.7"] - images["0.0"]).max() > 2  # the style scale reaches the image
    params = read_metadata(tmp_path / "style_0.7.png")["params"]
    # the shipped LoRA is recorded by the name that resolves in any clone (records that travel)
    assert params["lora"] == ["eligen-tiny/eligen_lora.safetensors", str(style_lora)]
    assert params["lora_scale"] == [1.0, 0.7]
