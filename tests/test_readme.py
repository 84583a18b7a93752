"""Every Python snippet of the README runs, on the tiny models. The table says what the tiny run changes in each
snippet (model ids, devices, sizes, steps); every change must find its text, so README and test stay in step."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)

FLUX_1024 = {  # the README's FLUX examples at 1024 px -> the shipped tiny model at 64 px
    'EliGenPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")':
        'EliGenPipeline.from_pretrained("eligen-tiny", load_default_lora=False, dtype=torch.float32).to("cpu")',
    'pipe.load_eligen_lora("modelscope/EliGen")': "pipe.load_eligen_lora(TINY_LORA)",
    'mask="apple_mask.png"': 'mask="examples/masks/tiny_blob.png"',
    "box=(560, 200, 900, 640)": "box=(35, 12, 56, 40)",
    "polygon=[(100, 900), (250, 700), (400, 900)]": "polygon=[(6, 56), (16, 44), (25, 56)]",
    "height=1024, width=1024,\n    num_inference_steps=50": "height=64, width=64,\n    num_inference_steps=2",
}
CHANGES = [
    FLUX_1024,
    {"np.zeros((1024, 1024), dtype=bool)": "np.zeros((64, 64), dtype=bool)",
     "mask[200:640, 100:500]": "mask[12:40, 6:31]",
     "torch.randn(1, 4096, 64,": "torch.randn(1, 256, 16,", "height=1024, width=1024,": "height=64, width=64,",
     "reference_sigmas(50)": "reference_sigmas(2)"},
    {'EliGenQwenImagePipeline.from_pretrained("Qwen/Qwen-Image", dtype=torch.bfloat16).to("cuda")':
        'EliGenQwenImagePipeline.from_pretrained(TINY_QWEN, dtype=torch.float32).to("cpu")',
     'pipe.load_eligen_lora("DiffSynth-Studio/Qwen-Image-EliGen-V2")': "pipe.load_eligen_lora(QWEN_LORA)",
     "box=(300, 150, 720, 600)": "box=(18, 9, 45, 37)", "box=(0, 650, 1024, 1024)": "box=(0, 40, 64, 64)",
     "num_inference_steps=40, height=1024, width=1024": "num_inference_steps=2, height=64, width=64"},
    {'image="room.png"': "image=ROOM", "box=(100, 500, 420, 900)": "box=(6, 30, 26, 56)",
     "true_cfg_scale=3.0).images[0]": "true_cfg_scale=3.0, num_inference_steps=2).images[0]"},
    {'"XLabs-AI/flux-ip-adapter"': "TINY_IP", '"openai/clip-vit-large-patch14"': "TINY_IP_ENCODER",
     'image="tabby.jpg"': "image=TABBY", 'ip_adapter_image="watercolor.png"': "ip_adapter_image=STYLE",
     "box=(80, 300, 480, 900)": "box=(5, 18, 30, 56)", "box=(560, 260, 980, 920)": "box=(35, 16, 61, 58)",
     "height=1024, width=1024, num_inference_steps=50": "height=64, width=64, num_inference_steps=2"},
    {'"InstantX/FLUX.1-dev-Controlnet-Canny", dtype=torch.bfloat16': "TINY_CONTROLNET, dtype=torch.float32",
     '"black-forest-labs/FLUX.1-dev", controlnet=controlnet': '"eligen-tiny", controlnet=controlnet',
     'dtype=torch.bfloat16).to("cuda")': 'dtype=torch.float32).to("cpu")',
     'load_image("garden_edges.png")': "load_image(EDGES)", 'control_image="cat_edges.png"': "control_image=EDGES",
     "box=(80, 300, 480, 900)": "box=(5, 18, 30, 56)", "box=(560, 260, 980, 920)": "box=(35, 16, 61, 58)",
     "height=1024, width=1024, num_inference_steps=28": "height=64, width=64, num_inference_steps=2"},
]


def test_the_table_covers_every_snippet():
    assert len(SNIPPETS) == len(CHANGES)


@pytest.fixture(scope="module")
def names(tiny_qwen_dir, tmp_path_factory):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel, QwenImageTransformer2DModel

    from eligen.families.flux.testing import save_tiny_ip_adapter
    from eligen.families.qwen_image.model import QWEN_IMAGE
    from eligen.models import TINY_MODEL_DIR

    folder = tmp_path_factory.mktemp("readme")
    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_dir, subfolder="transformer")
    modules, g, state = dict(transformer.named_modules()), torch.Generator().manual_seed(0), {}
    for name in QWEN_IMAGE.lora_train_names(transformer):  # the released Qwen-Image-EliGen form
        state[f"{name}.lora_A.default.weight"] = torch.randn(4, modules[name].in_features, generator=g) * 0.1
        state[f"{name}.lora_B.default.weight"] = torch.randn(modules[name].out_features, 4, generator=g) * 0.1
    save_file(state, str(folder / "qwen_lora.safetensors"))
    room = folder / "room.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(room)
    Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / "style.png")
    Image.fromarray((np.random.default_rng(2).random((48, 40, 3)) * 255).astype(np.uint8)).save(folder / "tabby.jpg")
    config = FluxTransformer2DModel.load_config(TINY_MODEL_DIR, subfolder="transformer")
    ip = save_tiny_ip_adapter(folder / "ip", type("Config", (), config))
    transformer = FluxTransformer2DModel.from_pretrained(TINY_MODEL_DIR, subfolder="transformer")
    FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                         attention_head_dim=config["attention_head_dim"],
                                         num_attention_heads=config["num_attention_heads"]).save_pretrained(
        folder / "controlnet")
    return {"TINY_LORA": str(TINY_MODEL_DIR / "eligen_lora.safetensors"), "TINY_QWEN": str(tiny_qwen_dir),
            "QWEN_LORA": str(folder / "qwen_lora.safetensors"), "ROOM": str(room), "TINY_IP": str(folder / "ip"),
            "TINY_IP_ENCODER": ip["image_encoder_pretrained_model_name_or_path"], "STYLE": str(folder / "style.png"),
            "TABBY": str(folder / "tabby.jpg"), "TINY_CONTROLNET": str(folder / "controlnet"), "EDGES": str(room)}


def test_every_python_snippet_runs_on_the_tiny_models(names, monkeypatch):
    monkeypatch.chdir(README.parent)
    namespace = dict(names)
    for index, (code, changes) in enumerate(zip(SNIPPETS, CHANGES, strict=True)):
        for old, new in changes.items():
            assert old in code, f"README snippet {index} no longer holds {old!r}: update tests/test_readme.py"
            code = code.replace(old, new)
        if "EliGenQwenImagePipeline" in code:
            namespace["flux_pipe"] = namespace.get("pipe")
        exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
        if index == 2:
            namespace["pipe"] = namespace["flux_pipe"]  # the inpainting snippet continues the FLUX example
    assert isinstance(namespace["image"], Image.Image) and isinstance(namespace["out"], Image.Image)
    assert isinstance(namespace["styled"], Image.Image) and isinstance(namespace["controlled"], Image.Image)
