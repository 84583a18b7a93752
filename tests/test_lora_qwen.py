"""EliGen LoRAs for Qwen-Image: the reference file form (DiffSynth-Studio/Qwen-Image-EliGen), kohya and diffusers
keys, round trips, the family checks against FLUX, peft loading against a hand merge, and `eligen lora`.

As in test_lora.py the key names are written out here from the specification, independently of ``eligen.lora``'s
tables, and the expected transformer is a deep copy whose ``nn.Linear`` weights get ``W + (alpha / r) * B @ A``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eligen.lora import (
    LoraFormatError,
    check_fits,
    lora_family,
    peft_config,
    read_lora,
    transformer_family,
    write_diffusers,
    write_lora,
)
from reference import read_deltas

FORWARD_TOL = 1e-5
RANK = 4

# The 14 linear layers of a Qwen-Image transformer block, with their kohya names (dots as underscores).
KOHYA_NAMES = {
    "attn.to_q": "attn_to_q", "attn.to_k": "attn_to_k", "attn.to_v": "attn_to_v",
    "attn.add_q_proj": "attn_add_q_proj", "attn.add_k_proj": "attn_add_k_proj", "attn.add_v_proj": "attn_add_v_proj",
    "attn.to_out.0": "attn_to_out_0", "attn.to_add_out": "attn_to_add_out",
    "img_mlp.net.0.proj": "img_mlp_net_0_proj", "img_mlp.net.2": "img_mlp_net_2",
    "txt_mlp.net.0.proj": "txt_mlp_net_0_proj", "txt_mlp.net.2": "txt_mlp_net_2",
    "img_mod.1": "img_mod_1", "txt_mod.1": "txt_mod_1",
}
# What the reference training adapts (rank 32 there).
REFERENCE_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
)
FORMATS = ("diffsynth", "kohya", "diffusers")


# ----------------------------------------------------------------------------------------------------------
# Tiny transformers and LoRA files built by hand
# ----------------------------------------------------------------------------------------------------------


def tiny_qwen(head_dim: int = 8, num_layers: int = 2, device: str | None = None):
    """A QwenImageTransformer2DModel at toy size: width 2 * head_dim, no single blocks."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, head_dim - 4),
        ).eval()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen()


@pytest.fixture(scope="module")
def flux():
    """The tiny FLUX transformer of eligen.families.flux.testing (width 32)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def random_layers(transformer, targets=REFERENCE_TARGETS, rank: int = RANK,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B [out, r]), random and non-zero, for ``targets`` in every transformer block."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(len(transformer.transformer_blocks)):
        for target in targets:
            linear = transformer.get_submodule(f"transformer_blocks.{i}.{target}")
            assert isinstance(linear, torch.nn.Linear), target
            down = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator) * 0.5 / rank**0.5
            out[f"transformer_blocks.{i}.{target}"] = (down, up)
    return out


def reference_state(layers) -> dict[str, torch.Tensor]:
    """The released Qwen-Image EliGen form: peft names, ``.default``, no prefix, no alpha."""
    out = {}
    for module, (down, up) in layers.items():
        out[f"{module}.lora_A.default.weight"] = down
        out[f"{module}.lora_B.default.weight"] = up
    return out


def kohya_name(module: str) -> str:
    index, target = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module).groups()
    return f"lora_unet_transformer_blocks_{index}_{KOHYA_NAMES[target]}"


def kohya_state(layers, alpha: float | None) -> dict[str, torch.Tensor]:
    out = {}
    for module, (down, up) in layers.items():
        stem = kohya_name(module)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return out


def hand_deltas(layers, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """module -> (alpha / r) * B @ A in float64."""
    out = {}
    for module, (down, up) in layers.items():
        scale = (alpha if alpha is not None else down.shape[0]) / down.shape[0]
        out[module] = scale * up.double() @ down.double()
    return out


def assert_deltas(weights, expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    got = read_deltas(weights)
    assert set(got) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=atol, rtol=0, msg=name)


def flux_diffsynth_state(flux, rank: int = RANK) -> dict[str, torch.Tensor]:
    """A FLUX DiffSynth LoRA (fused names, test_lora.py's tables): img q/k/v and the img MLP of block 0."""
    width = flux.config.num_attention_heads * flux.config.attention_head_dim
    generator = torch.Generator().manual_seed(5)
    shapes = {"attn.a_to_qkv": (width, 3 * width), "ff_a.0": (width, 4 * width), "ff_a.2": (4 * width, width)}
    out = {}
    for name, (fan_in, rows) in shapes.items():
        out[f"blocks.0.{name}.lora_A.default.weight"] = torch.randn(rank, fan_in, generator=generator)
        out[f"blocks.0.{name}.lora_B.default.weight"] = torch.randn(rows, rank, generator=generator)
    return out


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------


def test_tiny_qwen_has_the_reference_modules(qwen):
    assert transformer_family(qwen) == "qwen_image"
    assert not hasattr(qwen, "single_transformer_blocks")
    linears = {n for n, m in qwen.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("transformer_")}
    assert linears == {f"transformer_blocks.{i}.{m}" for i in range(2) for m in KOHYA_NAMES}


def test_family_of_transformers_and_names(qwen, flux):
    assert transformer_family(flux) == "flux"
    with pytest.raises(ValueError, match="Linear"):
        transformer_family(torch.nn.Linear(2, 2))
    ambiguous = read_lora(reference_state(random_layers(qwen, ["attn.to_q"])))[0]
    with pytest.raises(LoraFormatError, match="cannot tell"):
        lora_family(ambiguous)
    assert lora_family(ambiguous, family="qwen_image") == "qwen_image"
    assert lora_family(ambiguous, family="flux") == "flux"
    mixed = {**read_lora(reference_state(random_layers(qwen, ["img_mod.1"])))[0],
             **read_lora(flux_diffsynth_state(flux))[0]}
    with pytest.raises(LoraFormatError, match="mixes"):
        lora_family(mixed)
    assert lora_family(read_lora(flux_diffsynth_state(flux))[0]) == "flux"


# ----------------------------------------------------------------------------------------------------------
# Reading and round trips
# ----------------------------------------------------------------------------------------------------------


def test_reference_file_reads_as_qwen(qwen):
    layers = random_layers(qwen)
    weights, fmt = read_lora(reference_state(layers))
    assert fmt == "diffsynth"
    assert lora_family(weights) == "qwen_image"
    assert len(weights) == 2 * 12
    assert_deltas(weights, hand_deltas(layers))
    for name, layer in weights.items():
        assert layer.scale == 1.0, name


def test_kohya_and_diffusers_files_read_as_qwen(qwen):
    layers = random_layers(qwen, tuple(KOHYA_NAMES), seed=1)  # all 14 block layers, mlp inputs included
    weights, fmt = read_lora(kohya_state(layers, alpha=2.0))
    assert fmt == "kohya" and lora_family(weights) == "qwen_image"
    assert_deltas(weights, hand_deltas(layers, alpha=2.0))
    prefixed = {f"transformer.{m}.lora_{ab}.weight": t
                for m, (a, b) in layers.items() for ab, t in (("A", a), ("B", b))}
    weights, fmt = read_lora(prefixed)
    assert fmt == "diffusers" and lora_family(weights) == "qwen_image"
    assert_deltas(weights, hand_deltas(layers))


@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("source", ["reference", "kohya-alpha"])
def test_round_trip(source, target, qwen):
    layers = random_layers(qwen, seed=2)
    state = reference_state(layers) if source == "reference" else kohya_state(layers, alpha=6.0)
    original, _ = read_lora(state)
    written = write_lora(original, target)
    again, fmt = read_lora(written)
    assert fmt == target
    assert lora_family(again) == "qwen_image"
    if source == "reference":  # alpha = rank: the very same deltas come back
        assert_deltas(again, read_deltas(original))
    else:  # diffsynth folds alpha into B
        assert_deltas(again, hand_deltas(layers, alpha=6.0), atol=1e-6)


def test_round_trip_through_every_format(qwen):
    layers = random_layers(qwen, seed=3)
    weights, _ = read_lora(reference_state(layers))
    for target in ("kohya", "diffusers", "diffsynth", "kohya", "diffsynth"):
        weights, fmt = read_lora(write_lora(weights, target))
        assert fmt == target
    assert_deltas(weights, hand_deltas(layers))
    assert write_lora(weights, "diffsynth").keys() == reference_state(layers).keys()


def test_written_keys_follow_the_spec(qwen):
    layers = random_layers(qwen, seed=4)
    weights, _ = read_lora(reference_state(layers))
    diffsynth = write_lora(weights, "diffsynth")
    assert set(diffsynth) == set(reference_state(layers))
    for key, tensor in reference_state(layers).items():
        assert torch.equal(diffsynth[key], tensor), key
    kohya = write_lora(weights, "kohya")
    assert set(kohya) == set(kohya_state(layers, alpha=None))
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in kohya
    assert "lora_unet_transformer_blocks_1_attn_to_out_0.lora_up.weight" in kohya
    assert float(kohya["lora_unet_transformer_blocks_0_img_mod_1.alpha"]) == RANK
    diffusers = write_lora(weights, "diffusers")
    assert set(diffusers) == {f"transformer.{m}.lora_{ab}.weight" for m in layers for ab in "AB"}


def test_layer_names_common_to_both_families(qwen, tmp_path):
    """Only attention layers: a Qwen kohya file says Qwen-Image by its key style, and converts as Qwen-Image."""
    from eligen.lora import LoraConvertConfig, convert_lora_file, load_state_dict

    layers = random_layers(qwen, ["attn.to_q", "attn.to_k"], seed=6)
    source = save(kohya_state(layers, alpha=None), tmp_path / "attn.safetensors")
    out = tmp_path / "attn-diffsynth.safetensors"
    assert convert_lora_file(LoraConvertConfig(input=source, output=out, to="diffsynth")) == ("kohya", len(layers) * 2)
    state = load_state_dict(out)
    assert set(state) == set(reference_state(layers))
    assert read_lora(state)[1] == "diffusers"  # the names alone cannot tell: peft keys
    assert read_lora(state, family="qwen_image")[1] == "diffsynth"
    weights, _ = read_lora(state)
    assert set(write_lora(weights, "diffsynth", family="qwen_image")) == set(reference_state(layers))
    assert set(write_lora(weights, "kohya", family="qwen_image")) == set(kohya_state(layers, alpha=None))


def test_read_with_family_checks_the_file(qwen, flux):
    with pytest.raises(LoraFormatError, match=r"FLUX\.1, not Qwen-Image"):
        read_lora(flux_diffsynth_state(flux), family="qwen_image")
    with pytest.raises(LoraFormatError, match=r"Qwen-Image, not FLUX\.1"):
        read_lora(reference_state(random_layers(qwen)), family="flux")
    with pytest.raises(ValueError, match="sdxl"):
        read_lora(reference_state(random_layers(qwen)), family="sdxl")


def _bad_kohya_unknown(qwen):
    state = kohya_state(random_layers(qwen, ["attn.to_q"]), alpha=None)
    state["lora_unet_transformer_blocks_0_attn_bogus.lora_down.weight"] = torch.zeros(RANK, 16)
    state["lora_unet_transformer_blocks_0_attn_bogus.lora_up.weight"] = torch.zeros(16, RANK)
    return state, "attn_bogus"


def _bad_kohya_mixed(qwen):
    state = kohya_state(random_layers(qwen, ["img_mod.1"]), alpha=None)
    state["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = torch.zeros(RANK, 16)
    state["lora_unet_double_blocks_0_img_mod_lin.lora_up.weight"] = torch.zeros(96, RANK)
    return state, "lora_unet_double_blocks_0_img_mod_lin"


def _bad_non_lora_key(qwen):
    state = reference_state(random_layers(qwen))
    state["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(16, 16)
    return state, r"unrecognised keys: transformer_blocks\.0\.attn\.to_q\.weight"


def _bad_missing_up(qwen):
    state = reference_state(random_layers(qwen))
    del state["transformer_blocks.1.txt_mod.1.lora_B.default.weight"]
    return state, r"transformer_blocks\.1\.txt_mod\.1"


def _bad_kohya_missing_down(qwen):
    state = kohya_state(random_layers(qwen), alpha=None)
    del state["lora_unet_transformer_blocks_0_img_mlp_net_2.lora_down.weight"]
    return state, r"transformer_blocks\.0\.img_mlp\.net\.2"


BAD_CASES = {f.__name__.removeprefix("_bad_"): f for f in (
    _bad_kohya_unknown, _bad_kohya_mixed, _bad_non_lora_key, _bad_missing_up, _bad_kohya_missing_down,
)}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_qwen_file_is_refused(case, qwen):
    state, pattern = BAD_CASES[case](qwen)
    with pytest.raises(LoraFormatError, match=pattern):
        read_lora(state)


def test_layer_outside_the_blocks_has_no_kohya_name(qwen):
    state = reference_state(random_layers(qwen, ["img_mod.1"]))
    state["img_in.lora_A.default.weight"] = torch.randn(2, 16)
    state["img_in.lora_B.default.weight"] = torch.randn(16, 2)
    weights, fmt = read_lora(state)
    assert fmt == "diffsynth"
    with pytest.raises(LoraFormatError, match="img_in"):
        write_lora(weights, "kohya")
    for target in ("diffsynth", "diffusers"):  # peft names can hold it
        assert set(read_lora(write_lora(weights, target))[0]) == set(weights)


# ----------------------------------------------------------------------------------------------------------
# Checks against a transformer
# ----------------------------------------------------------------------------------------------------------


def test_check_fits_refuses_the_other_family(qwen, flux):
    weights, _ = read_lora(reference_state(random_layers(qwen)))
    check_fits(weights, qwen)
    with pytest.raises(LoraFormatError, match=r"for Qwen-Image but the pipeline's transformer is FLUX.1"):
        check_fits(weights, flux)
    flux_weights, _ = read_lora(flux_diffsynth_state(flux))
    check_fits(flux_weights, flux)
    with pytest.raises(LoraFormatError, match=r"for FLUX.1 but the pipeline's transformer is Qwen-Image"):
        check_fits(flux_weights, qwen)


def test_check_fits_refuses_other_shapes_and_depths(qwen):
    wider = random_layers(tiny_qwen(head_dim=16, device="meta"))  # a LoRA for a width-32 model
    with pytest.raises(LoraFormatError, match="do not match the layer shapes"):
        check_fits(read_lora(reference_state(wider))[0], qwen)
    deeper = random_layers(tiny_qwen(num_layers=3))
    with pytest.raises(LoraFormatError, match=r"do not exist.*transformer_blocks\.2\."):
        check_fits(read_lora(reference_state(deeper))[0], qwen)


# ----------------------------------------------------------------------------------------------------------
# Loading with peft (as EliGenPipeline.load_eligen_lora does) against a hand merge
# ----------------------------------------------------------------------------------------------------------


def qwen_inputs(transformer, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    side, text = 4, 6  # a 4x4 grid of 2x2 patches
    channels = transformer.config.in_channels
    return {
        "hidden_states": torch.randn(1, side * side, channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, transformer.config.joint_attention_dim, generator=generator),
        "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long),
        "timestep": torch.tensor([0.7]),
        "img_shapes": [[(1, side, side)]],
    }


def forward(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def merged(transformer, deltas: dict[str, torch.Tensor]):
    out = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, delta in deltas.items():
            linear = out.get_submodule(name)
            assert isinstance(linear, torch.nn.Linear), name
            linear.weight += delta.to(linear.weight.dtype)
    return out


def load_like_the_pipeline(transformer, state: dict[str, torch.Tensor], adapter: str = "eligen"):
    """EliGenPipeline.load_eligen_lora on a bare transformer: read, check, load peft keys with alpha folded."""
    weights, fmt = read_lora(state)
    check_fits(weights, transformer)
    peft_state = {k: v.to(transformer.dtype) for k, v in write_diffusers(weights, with_alpha=False).items()}
    transformer.load_lora_adapter(peft_state, prefix="transformer", adapter_name=adapter,
                                  metadata=peft_config(weights), low_cpu_mem_usage=True)
    transformer.set_adapter([adapter])
    return weights, fmt


@pytest.mark.parametrize("source", ["reference", "kohya-alpha"])
def test_peft_load_equals_hand_merge(source, qwen):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = random_layers(qwen, seed=9)
    alpha = 2.0 if source == "kohya-alpha" else None
    state = reference_state(layers) if alpha is None else kohya_state(layers, alpha=alpha)
    inputs = qwen_inputs(qwen)
    base = forward(qwen, inputs)
    expected = forward(merged(qwen, hand_deltas(layers, alpha)), inputs)
    adapted = copy.deepcopy(qwen)
    load_like_the_pipeline(adapted, state)
    wrapped = {n for n, m in adapted.named_modules() if isinstance(m, BaseTunerLayer)}
    assert wrapped == set(layers)
    actual = forward(adapted, inputs)
    diff = (actual - expected).abs().max().item()
    assert diff <= FORWARD_TOL, f"forward differs from the hand merge by {diff:g}"
    assert (expected - base).abs().max().item() > 1e-2, "the LoRA must visibly change the forward"


# ----------------------------------------------------------------------------------------------------------
# `eligen lora info / convert`
# ----------------------------------------------------------------------------------------------------------


def run_cli(argv, capsys) -> dict[str, str]:
    from eligen.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def test_lora_info(qwen, flux, tmp_path, capsys):
    path = save(reference_state(random_layers(qwen)), tmp_path / "model.safetensors")
    fields = run_cli(["lora", "info", path], capsys)
    assert fields["format"] == "diffsynth" and fields["family"] == "qwen_image"
    assert fields["rank"] == str(RANK) and fields["alpha"] == str(RANK)
    assert [int(n) for n in re.findall(r"\d+", fields["adapted layers"])] == [24, 24]
    assert fields["double blocks"] == "0-1" and fields.get("single blocks", "none") == "none"
    flux_path = save(flux_diffsynth_state(flux), tmp_path / "flux.safetensors")
    assert run_cli(["lora", "info", flux_path], capsys)["family"] == "flux"


@pytest.mark.parametrize("target", FORMATS)
def test_lora_convert(target, qwen, tmp_path, capsys):
    layers = random_layers(qwen, seed=10)
    source = save(kohya_state(layers, alpha=8.0), tmp_path / "kohya.safetensors")
    out = tmp_path / f"converted-{target}.safetensors"
    run_cli(["lora", "convert", source, out, "--to", target], capsys)
    fields = run_cli(["lora", "info", out], capsys)
    assert fields["format"] == target and fields["family"] == "qwen_image"
    from eligen.lora import load_state_dict

    weights, fmt = read_lora(load_state_dict(out))
    assert fmt == target
    assert_deltas(weights, hand_deltas(layers, alpha=8.0), atol=1e-6)
    back = tmp_path / f"back-{target}.safetensors"
    run_cli(["lora", "convert", out, back, "--to", "kohya"], capsys)
    assert run_cli(["lora", "info", back], capsys)["format"] == "kohya"
    assert set(load_state_dict(back)) == set(kohya_state(layers, alpha=None))
