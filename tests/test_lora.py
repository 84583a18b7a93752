"""EliGen LoRA files (docs/design.md section 4): the three key formats against hand-merged weights, the full-size
FLUX.1-dev layout on the meta device, refused files, format round trips, the `eligen lora` commands and
`generate --lora`, and LoRA path resolution.

Everything here is built from the specification, independently of ``eligen.lora``'s own tables: the key names
below are written out from docs/design.md section 4, fused ``lora_B`` rows are split by hand, and the expected
transformer is a deep copy of the base whose ``nn.Linear`` weights get ``W + (alpha / r) * B @ A`` added here.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from eligen import EliGenPipeline
from eligen.cli import main
from eligen.generate import read_metadata
from eligen.lora import LoraFormatError, check_fits, read_lora, resolve_lora_path, write_lora
from reference import read_deltas

FORWARD_TOL = 1e-5
DELTA_TOL = 1e-6

# ----------------------------------------------------------------------------------------------------------
# The specification, written out by hand (docs/design.md section 4)
# ----------------------------------------------------------------------------------------------------------


def double_table(width: int, mlp: int) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """DiffSynth name of a double-block layer -> (in_features, [(diffusers module, lora_B rows), ...])."""
    return {
        "attn.a_to_qkv": (width, [("attn.to_q", width), ("attn.to_k", width), ("attn.to_v", width)]),
        "attn.b_to_qkv": (width, [("attn.add_q_proj", width), ("attn.add_k_proj", width),
                                  ("attn.add_v_proj", width)]),
        "attn.a_to_out": (width, [("attn.to_out.0", width)]),
        "attn.b_to_out": (width, [("attn.to_add_out", width)]),
        "ff_a.0": (width, [("ff.net.0.proj", mlp)]),
        "ff_a.2": (mlp, [("ff.net.2", width)]),
        "ff_b.0": (width, [("ff_context.net.0.proj", mlp)]),
        "ff_b.2": (mlp, [("ff_context.net.2", width)]),
        "norm1_a.linear": (width, [("norm1.linear", 6 * width)]),  # shift, scale, gate for attn and mlp
        "norm1_b.linear": (width, [("norm1_context.linear", 6 * width)]),
    }


def single_table(width: int, mlp: int) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """DiffSynth name of a single-block layer -> (in_features, [(diffusers module, lora_B rows), ...])."""
    return {
        "to_qkv_mlp": (width, [("attn.to_q", width), ("attn.to_k", width), ("attn.to_v", width),
                               ("proj_mlp", mlp)]),
        "proj_out": (width + mlp, [("proj_out", width)]),
        "norm.linear": (width, [("norm.linear", 3 * width)]),  # shift, scale, gate
    }


KOHYA_DOUBLE_NAMES = {
    "attn.a_to_qkv": "img_attn_qkv", "attn.b_to_qkv": "txt_attn_qkv",
    "attn.a_to_out": "img_attn_proj", "attn.b_to_out": "txt_attn_proj",
    "ff_a.0": "img_mlp_0", "ff_a.2": "img_mlp_2", "ff_b.0": "txt_mlp_0", "ff_b.2": "txt_mlp_2",
    "norm1_a.linear": "img_mod_lin", "norm1_b.linear": "txt_mod_lin",
}
KOHYA_SINGLE_NAMES = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation_lin"}

# The 14 + 6 diffusers linear layers of a FLUX block that the 10 + 3 reference layers cover.
DOUBLE_MODULES = {
    "norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
    "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2",
}
SINGLE_MODULES = {"norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"}

DIFFUSERS_PREFIX = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def widths(config) -> tuple[int, int]:
    """(D, mlp) of a FluxTransformer2DModel config: D = heads * head_dim, mlp = 4 * D."""
    width = config.num_attention_heads * config.attention_head_dim
    return width, 4 * width


def table(kind: str, width: int, mlp: int):
    return double_table(width, mlp) if kind == "double" else single_table(width, mlp)


def all_reference_layers(num_double: int, num_single: int) -> list[tuple[str, int, str]]:
    out = [("double", i, name) for i in range(num_double) for name in KOHYA_DOUBLE_NAMES]
    return out + [("single", i, name) for i in range(num_single) for name in KOHYA_SINGLE_NAMES]


@dataclass
class Ref:
    """One reference (fused) layer of a DiffSynth/kohya LoRA."""

    kind: str  # "double" | "single"
    index: int
    name: str  # DiffSynth name, e.g. "attn.a_to_qkv"
    down: torch.Tensor  # A (r, in)
    up: torch.Tensor  # B (out, r)
    alpha: float | None = None


@dataclass
class Mod:
    """One diffusers-named layer of a peft LoRA."""

    module: str  # e.g. "transformer_blocks.0.attn.to_q"
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None


def rand_pair(rank: int, fan_in: int, rows: int, generator: torch.Generator, strength: float = 0.5,
              device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if device == "meta":
        return torch.empty(rank, fan_in, device="meta"), torch.empty(rows, rank, device="meta")
    down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
    up = torch.randn(rows, rank, generator=generator) * strength / rank**0.5
    return down, up


def make_refs(layers, width: int, mlp: int, ranks=(4,), alpha: float | None = None, seed: int = 0,
              strength: float = 0.5, device: str | None = None) -> list[Ref]:
    """Random reference layers ``[(kind, block, name), ...]``; ranks cycle through ``ranks``."""
    generator = torch.Generator().manual_seed(seed)
    refs = []
    for j, (kind, index, name) in enumerate(layers):
        fan_in, members = table(kind, width, mlp)[name]
        rank = ranks[j % len(ranks)]
        down, up = rand_pair(rank, fan_in, sum(rows for _, rows in members), generator, strength, device)
        refs.append(Ref(kind, index, name, down, up, alpha))
    return refs


def make_mods(layers, width: int, mlp: int, ranks=(4,), alphas=(None,), seed: int = 0,
              strength: float = 0.5) -> list[Mod]:
    """Random peft layers, one independent A per diffusers module: ``[(kind, block, module), ...]``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    for kind in ("double", "single"):
        for fan_in, members in table(kind, width, mlp).values():
            for module, rows in members:
                shapes[(kind, module)] = (fan_in, rows)
    mods = []
    for j, (kind, index, module) in enumerate(layers):
        fan_in, rows = shapes[(kind, module)]
        down, up = rand_pair(ranks[j % len(ranks)], fan_in, rows, generator, strength)
        mods.append(Mod(f"{DIFFUSERS_PREFIX[kind]}.{index}.{module}", down, up, alphas[j % len(alphas)]))
    return mods


def diffsynth_state(refs: list[Ref], default: bool) -> dict[str, torch.Tensor]:
    suffix = ".default" if default else ""
    out = {}
    for ref in refs:
        assert ref.alpha is None, "DiffSynth files carry no alpha"
        stem = f"{'blocks' if ref.kind == 'double' else 'single_blocks'}.{ref.index}.{ref.name}"
        out[f"{stem}.lora_A{suffix}.weight"] = ref.down
        out[f"{stem}.lora_B{suffix}.weight"] = ref.up
    return out


def kohya_state(refs: list[Ref], with_alpha: bool) -> dict[str, torch.Tensor]:
    out = {}
    for ref in refs:
        names = KOHYA_DOUBLE_NAMES if ref.kind == "double" else KOHYA_SINGLE_NAMES
        stem = f"lora_unet_{ref.kind}_blocks_{ref.index}_{names[ref.name]}"
        out[f"{stem}.lora_down.weight"] = ref.down
        out[f"{stem}.lora_up.weight"] = ref.up
        if with_alpha:
            out[f"{stem}.alpha"] = torch.tensor(float(ref.alpha if ref.alpha is not None else ref.down.shape[0]))
    return out


def diffusers_state(mods: list[Mod]) -> dict[str, torch.Tensor]:
    out = {}
    for mod in mods:
        out[f"transformer.{mod.module}.lora_A.weight"] = mod.down
        out[f"transformer.{mod.module}.lora_B.weight"] = mod.up
        if mod.alpha is not None:
            out[f"transformer.{mod.module}.alpha"] = torch.tensor(float(mod.alpha))
    return out


def ref_deltas(refs: list[Ref], width: int, mlp: int) -> dict[str, torch.Tensor]:
    """diffusers module -> (alpha / r) * B_rows @ A, splitting fused B rows by the table."""
    out = {}
    for ref in refs:
        rank = ref.down.shape[0]
        scale = (ref.alpha if ref.alpha is not None else rank) / rank
        _, members = table(ref.kind, width, mlp)[ref.name]
        start = 0
        for module, rows in members:
            part = ref.up[start:start + rows]
            start += rows
            out[f"{DIFFUSERS_PREFIX[ref.kind]}.{ref.index}.{module}"] = scale * part.double() @ ref.down.double()
        assert start == ref.up.shape[0]
    return out


def mod_deltas(mods: list[Mod]) -> dict[str, torch.Tensor]:
    out = {}
    for mod in mods:
        rank = mod.down.shape[0]
        scale = (mod.alpha if mod.alpha is not None else rank) / rank
        out[mod.module] = scale * mod.up.double() @ mod.down.double()
    return out


# ----------------------------------------------------------------------------------------------------------
# Transformer forward and hand merging
# ----------------------------------------------------------------------------------------------------------


def forward_inputs(transformer, seed: int = 1) -> dict[str, torch.Tensor]:
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    side, text = 4, 8
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros(side * side), rows.flatten(), cols.flatten()], dim=1).float()
    return {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.7]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.tensor([3.5]),
    }


def forward(transformer, inputs) -> torch.Tensor:
    dtype = transformer.dtype
    cast = {k: v.to(dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in inputs.items()}
    with torch.no_grad():
        return transformer(**cast, return_dict=False)[0].float()


def merged(transformer, *weighted: tuple[float, dict[str, torch.Tensor]]):
    """A deep copy of ``transformer`` with ``W += w * delta`` for every (w, {module: delta})."""
    out = copy.deepcopy(transformer)
    with torch.no_grad():
        for weight, deltas in weighted:
            for name, delta in deltas.items():
                linear = out.get_submodule(name)
                assert isinstance(linear, torch.nn.Linear), name
                linear.weight += (weight * delta).to(linear.weight.dtype)
    return out


def assert_forward_close(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= FORWARD_TOL, f"forward differs from the hand merge by {diff:g}"
    assert (expected - base).abs().max().item() > 1e-2, "the LoRA must visibly change the forward"


def adapted_modules(transformer, adapter: str | None = None) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in transformer.named_modules()
            if isinstance(module, BaseTunerLayer) and (adapter is None or adapter in module.lora_A)}


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture()
def fresh_pipe(tiny_pipeline_dir):
    """A pipeline of its own (LoRAs are added to it); the session ``tiny_pipe`` stays clean."""
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def dims(tiny_pipe):
    config = tiny_pipe.transformer.config
    width, mlp = widths(config)
    return width, mlp, config.num_layers, config.num_single_layers


def test_tiny_model_matches_the_tables(tiny_pipe, dims):
    """The hand-written widths and names describe the tiny transformer (else every test below is moot)."""
    width, mlp, num_double, num_single = dims
    assert (num_double, num_single) == (2, 2)
    modules = dict(tiny_pipe.transformer.named_modules())
    for kind, index, name in all_reference_layers(num_double, num_single):
        fan_in, members = table(kind, width, mlp)[name]
        for module, rows in members:
            linear = modules[f"{DIFFUSERS_PREFIX[kind]}.{index}.{module}"]
            assert isinstance(linear, torch.nn.Linear)
            assert (linear.in_features, linear.out_features) == (fan_in, rows), (kind, index, module)


# ----------------------------------------------------------------------------------------------------------
# 1. Loading each format == W + (alpha / r) * B @ A merged by hand
# ----------------------------------------------------------------------------------------------------------

FORMAT_CASES = ["diffsynth-default", "diffsynth", "kohya-alpha", "kohya", "diffusers"]
EXPECTED_FORMAT = {"diffsynth-default": "diffsynth", "diffsynth": "diffsynth", "kohya-alpha": "kohya",
                   "kohya": "kohya", "diffusers": "diffusers"}


def build_lora(case: str, coverage: str, dims, seed: int = 0, strength: float = 0.5):
    """(state dict written with the spec's key names, {module: delta}) for a format case and a coverage."""
    width, mlp, num_double, num_single = dims
    if case == "diffusers":
        if coverage == "all":
            layers = [(kind, i, m) for kind, count, names in (("double", num_double, sorted(DOUBLE_MODULES)),
                                                              ("single", num_single, sorted(SINGLE_MODULES)))
                      for i in range(count) for m in names]
        else:  # q and v of double block 0 (not k), the last single block's proj_out
            layers = [("double", 0, "attn.to_q"), ("double", 0, "attn.to_v"), ("single", num_single - 1, "proj_out")]
        mods = make_mods(layers, width, mlp, ranks=(4, 2, 3), seed=seed, strength=strength)
        return diffusers_state(mods), mod_deltas(mods)
    if coverage == "all":
        layers = all_reference_layers(num_double, num_single)
    else:  # only block 0's a_to_qkv and the last single block's proj_out
        layers = [("double", 0, "attn.a_to_qkv"), ("single", num_single - 1, "proj_out")]
    alpha = 2.5 if case == "kohya-alpha" else None
    refs = make_refs(layers, width, mlp, ranks=(4, 2, 3), alpha=alpha, seed=seed, strength=strength)
    if case.startswith("diffsynth"):
        state = diffsynth_state(refs, default=case == "diffsynth-default")
    else:
        state = kohya_state(refs, with_alpha=case == "kohya-alpha")
    return state, ref_deltas(refs, width, mlp)


@pytest.mark.parametrize("coverage", ["all", "partial"])
@pytest.mark.parametrize("case", FORMAT_CASES)
def test_load_equals_hand_merge(case, coverage, fresh_pipe, dims, tmp_path):
    state, deltas = build_lora(case, coverage, dims)
    if case == "kohya-alpha":
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")}
        assert 4 in ranks and all(v.item() == 2.5 for k, v in state.items() if k.endswith(".alpha"))
    path = save(state, tmp_path / "lora.safetensors")
    transformer = fresh_pipe.transformer
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    expected = forward(merged(transformer, (1.0, deltas)), inputs)

    assert fresh_pipe.load_eligen_lora(path) == EXPECTED_FORMAT[case]
    assert_forward_close(forward(transformer, inputs), expected, base)
    assert adapted_modules(transformer, "eligen") == set(deltas)  # exactly the layers in the file, no more
    assert fresh_pipe.get_list_adapters() == {"transformer": ["eligen"]}


def test_diffusers_lora_outside_the_blocks(fresh_pipe, tmp_path):
    """peft keys can name any linear layer: the top-level proj_out (not the single blocks' proj_out) and x_embedder."""
    generator = torch.Generator().manual_seed(4)
    config = fresh_pipe.transformer.config
    width = widths(config)[0]
    out_channels = fresh_pipe.transformer.proj_out.out_features
    mods = [Mod("proj_out", *rand_pair(2, width, out_channels, generator, strength=1.0), alpha=3.0),
            Mod("x_embedder", *rand_pair(3, config.in_channels, width, generator, strength=1.0))]
    transformer = fresh_pipe.transformer
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    expected = forward(merged(transformer, (1.0, mod_deltas(mods))), inputs)
    assert fresh_pipe.load_eligen_lora(save(diffusers_state(mods), tmp_path / "lora.safetensors")) == "diffusers"
    assert adapted_modules(transformer) == {"proj_out", "x_embedder"}
    assert_forward_close(forward(transformer, inputs), expected, base)


def test_scale_and_set_lora_scale(fresh_pipe, dims, tmp_path):
    state, deltas = build_lora("kohya-alpha", "all", dims)
    path = save(state, tmp_path / "lora.safetensors")
    transformer = fresh_pipe.transformer
    plain = copy.deepcopy(transformer)
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)

    fresh_pipe.load_eligen_lora(path, scale=0.5)
    assert_forward_close(forward(transformer, inputs), forward(merged(plain, (0.5, deltas)), inputs), base)
    fresh_pipe.set_lora_scale("eligen", 1.5)
    assert_forward_close(forward(transformer, inputs), forward(merged(plain, (1.5, deltas)), inputs), base)
    fresh_pipe.set_lora_scale("eligen", 0.0)
    torch.testing.assert_close(forward(transformer, inputs), base, atol=FORWARD_TOL, rtol=0)


def stacking_check(pipe, first, first_deltas, second, second_deltas, tmp_path) -> None:
    transformer = pipe.transformer
    plain = copy.deepcopy(transformer)
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)

    pipe.load_eligen_lora(save(first, tmp_path / "first.safetensors"), adapter_name="first")
    pipe.load_eligen_lora(save(second, tmp_path / "second.safetensors"), adapter_name="second")
    assert sorted(pipe.get_list_adapters()["transformer"]) == ["first", "second"]

    pipe.set_adapters(["first", "second"], [0.7, -0.4])
    expected = forward(merged(plain, (0.7, first_deltas), (-0.4, second_deltas)), inputs)
    assert_forward_close(forward(transformer, inputs), expected, base)

    pipe.set_lora_scale("first", 0.2)  # re-weights one adapter, the other keeps -0.4
    expected = forward(merged(plain, (0.2, first_deltas), (-0.4, second_deltas)), inputs)
    assert_forward_close(forward(transformer, inputs), expected, base)


def test_two_adapters_stack(fresh_pipe, dims, tmp_path):
    """Two LoRAs on different layers (DiffSynth, then kohya with alpha != rank) under two adapter names."""
    width, mlp, *_ = dims
    refs = make_refs([("double", 0, "attn.a_to_qkv"), ("double", 1, "ff_a.0"), ("single", 1, "norm.linear")],
                     width, mlp, ranks=(4, 2), seed=1)
    first, first_deltas = diffsynth_state(refs, default=True), ref_deltas(refs, width, mlp)
    refs = make_refs([("double", 0, "attn.b_to_qkv"), ("double", 1, "ff_b.2"), ("single", 0, "to_qkv_mlp")],
                     width, mlp, ranks=(3, 5), alpha=1.5, seed=2)
    second, second_deltas = kohya_state(refs, with_alpha=True), ref_deltas(refs, width, mlp)
    assert not set(first_deltas) & set(second_deltas)
    stacking_check(fresh_pipe, first, first_deltas, second, second_deltas, tmp_path)


def test_second_load_keeps_the_first_active(fresh_pipe, dims, tmp_path):
    width, mlp, *_ = dims
    refs = make_refs([("double", 0, "attn.a_to_qkv"), ("single", 1, "norm.linear")], width, mlp, seed=1)
    first, first_deltas = diffsynth_state(refs, default=True), ref_deltas(refs, width, mlp)
    refs = make_refs([("double", 0, "attn.b_to_qkv")], width, mlp, alpha=1.5, seed=2)
    second, second_deltas = kohya_state(refs, with_alpha=True), ref_deltas(refs, width, mlp)
    transformer = fresh_pipe.transformer
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    both = forward(merged(transformer, (1.0, first_deltas), (1.0, second_deltas)), inputs)
    fresh_pipe.load_eligen_lora(save(first, tmp_path / "first.safetensors"), adapter_name="first")
    fresh_pipe.load_eligen_lora(save(second, tmp_path / "second.safetensors"), adapter_name="second", scale=1.0)
    assert sorted(fresh_pipe.get_active_adapters()) == ["first", "second"]
    assert_forward_close(forward(transformer, inputs), both, base)


def test_two_overlapping_adapters_stack(fresh_pipe, dims, tmp_path):
    """Two LoRAs sharing layers: a full DiffSynth one and a kohya one on block 0's q/k/v and more."""
    width, mlp, *_ = dims
    first, first_deltas = build_lora("diffsynth-default", "all", dims, seed=1)
    refs = make_refs([("double", 0, "attn.a_to_qkv"), ("double", 1, "ff_b.2"), ("single", 0, "to_qkv_mlp")],
                     width, mlp, ranks=(3, 5), alpha=1.5, seed=2)
    second, second_deltas = kohya_state(refs, with_alpha=True), ref_deltas(refs, width, mlp)
    stacking_check(fresh_pipe, first, first_deltas, second, second_deltas, tmp_path)


def test_fuse_and_unfuse(fresh_pipe, dims, tmp_path):
    state, deltas = build_lora("kohya-alpha", "all", dims)
    transformer = fresh_pipe.transformer
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    expected = forward(merged(transformer, (1.0, deltas)), inputs)
    fresh_pipe.load_eligen_lora(save(state, tmp_path / "lora.safetensors"))
    unfused = forward(transformer, inputs)
    assert_forward_close(unfused, expected, base)

    name = "transformer_blocks.1.attn.to_k"
    before = transformer.get_submodule(name).base_layer.weight.detach().clone()
    fresh_pipe.fuse_lora()
    after = transformer.get_submodule(name).base_layer.weight.detach()
    torch.testing.assert_close(after.double(), before.double() + deltas[name], atol=DELTA_TOL, rtol=0)
    torch.testing.assert_close(forward(transformer, inputs), unfused, atol=FORWARD_TOL, rtol=0)

    fresh_pipe.unfuse_lora()
    torch.testing.assert_close(transformer.get_submodule(name).base_layer.weight.detach(), before,
                               atol=DELTA_TOL, rtol=0)
    torch.testing.assert_close(forward(transformer, inputs), unfused, atol=FORWARD_TOL, rtol=0)


def test_unload_restores_the_base_exactly(fresh_pipe, dims, tmp_path):
    state, _ = build_lora("diffsynth", "all", dims)
    transformer = fresh_pipe.transformer
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    fresh_pipe.load_eligen_lora(save(state, tmp_path / "lora.safetensors"), adapter_name="style")
    assert fresh_pipe.get_list_adapters() == {"transformer": ["style"]}
    assert not torch.allclose(forward(transformer, inputs), base, atol=1e-2)
    fresh_pipe.unload_lora_weights()
    assert torch.equal(forward(fresh_pipe.transformer, inputs), base)
    assert not adapted_modules(fresh_pipe.transformer)
    assert not fresh_pipe.get_list_adapters().get("transformer")


def test_loading_keeps_the_transformer_dtype(tiny_pipeline_dir, dims, tmp_path):
    state, deltas = build_lora("kohya-alpha", "all", dims)  # float32 tensors, float32 alpha
    path = save(state, tmp_path / "lora.safetensors")
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.bfloat16)
    transformer = pipe.transformer
    assert transformer.dtype == torch.bfloat16
    inputs = forward_inputs(transformer)
    base = forward(transformer, inputs)
    pipe.load_eligen_lora(path)
    params = dict(transformer.named_parameters())
    lora_params = {k: v for k, v in params.items() if ".lora_A." in k or ".lora_B." in k}
    assert len(lora_params) == 2 * len(deltas)
    assert {v.dtype for v in lora_params.values()} == {torch.bfloat16}
    assert {v.dtype for v in params.values()} == {torch.bfloat16}, "no float32 weight may appear"
    assert {b.dtype for b in transformer.buffers() if b.is_floating_point()} <= {torch.bfloat16}
    out = forward(transformer, inputs)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-2

    # and the other way round: a bfloat16 file in a float32 transformer stays float32
    bf16_path = save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "bf16.safetensors")
    pipe32 = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe32.load_eligen_lora(bf16_path)
    assert {v.dtype for v in pipe32.transformer.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------
# 2. Full size on the meta device: FLUX.1-dev has 304 reference layers = 494 diffusers linear layers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel()
    return transformer


def expected_full_names(num_double: int, num_single: int) -> set[str]:
    names = {f"transformer_blocks.{i}.{m}" for i in range(num_double) for m in DOUBLE_MODULES}
    return names | {f"single_transformer_blocks.{i}.{m}" for i in range(num_single) for m in SINGLE_MODULES}


@pytest.mark.parametrize("case", ["diffsynth-default", "kohya-alpha"])
def test_full_size_layout_on_meta(meta_flux, case):
    config = meta_flux.config
    assert len(meta_flux.transformer_blocks) == config.num_layers == 19
    assert len(meta_flux.single_transformer_blocks) == config.num_single_layers == 38
    assert (config.num_attention_heads, config.attention_head_dim) == (24, 128)
    width, mlp = widths(config)
    assert width == 3072
    layers = all_reference_layers(19, 38)
    assert len(layers) == 19 * 10 + 38 * 3 == 304
    refs = make_refs(layers, width, mlp, ranks=(2,), alpha=2.0 if case == "kohya-alpha" else None, device="meta")
    state = diffsynth_state(refs, default=True) if case.startswith("diffsynth") else kohya_state(refs, True)
    assert len(state) == 2 * 304 + (304 if case == "kohya-alpha" else 0)

    weights, fmt = read_lora(state)
    assert fmt == EXPECTED_FORMAT[case]
    check_fits(weights, meta_flux)
    assert len(weights) == 19 * 14 + 38 * 6 == 494
    assert set(weights) == expected_full_names(19, 38)
    modules = dict(meta_flux.named_modules())
    for name, layer in weights.items():
        module = modules[name]
        assert isinstance(module, torch.nn.Linear), name
        assert layer.down.shape == (2, module.in_features), name
        assert layer.up.shape == (module.out_features, 2), name


# ----------------------------------------------------------------------------------------------------------
# 3. Refused files: a clear LoraFormatError, and nothing applied
# ----------------------------------------------------------------------------------------------------------


def _good(dims) -> dict[str, torch.Tensor]:
    return build_lora("diffsynth-default", "all", dims)[0]


def _bad_unknown_layer(dims):
    state = _good(dims)
    state["blocks.0.attn.bogus.lora_A.default.weight"] = torch.zeros(4, dims[0])
    state["blocks.0.attn.bogus.lora_B.default.weight"] = torch.zeros(dims[0], 4)
    return state, r"attn\.bogus"


def _bad_non_lora_key(dims):
    state = _good(dims)
    state["blocks.0.attn.to_q.weight"] = torch.zeros(dims[0], dims[0])
    return state, r"blocks\.0\.attn\.to_q\.weight"


def _bad_kohya_unknown(dims):
    width, mlp, *_ = dims
    refs = make_refs([("double", 0, "attn.a_to_qkv")], width, mlp)
    state = kohya_state(refs, with_alpha=True)
    state["lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight"] = torch.zeros(4, width)
    state["lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight"] = torch.zeros(width, 4)
    return state, "img_attn_bogus"


def _bad_missing_up(dims):
    state = _good(dims)
    del state["blocks.1.ff_a.2.lora_B.default.weight"]
    return state, r"blocks\.1\.ff_a\.2"


def _bad_kohya_missing_down(dims):
    width, mlp, *_ = dims
    refs = make_refs([("single", 1, "norm.linear"), ("double", 0, "ff_b.0")], width, mlp)
    state = kohya_state(refs, with_alpha=True)
    del state["lora_unet_single_blocks_1_modulation_lin.lora_down.weight"]
    return state, r"1.*norm\.linear|modulation_lin"


def _bad_rank_mismatch(dims):
    state = _good(dims)
    state["single_blocks.0.proj_out.lora_B.default.weight"] = torch.zeros(dims[0], 3)  # A has rank 4
    return state, r"single_blocks\.0\.proj_out"


def _bad_fused_rows(dims):
    state = _good(dims)
    key = "blocks.1.attn.b_to_qkv.lora_B.default.weight"
    state[key] = torch.zeros(3 * dims[0] + 1, state[key].shape[1])
    return state, r"blocks\.1\.attn\.b_to_qkv"


def _bad_wider_model(dims):
    _, _, num_double, num_single = dims
    refs = make_refs(all_reference_layers(num_double, num_single), 64, 256)  # a LoRA for a 64-wide model
    return diffsynth_state(refs, default=False), r"transformer_blocks\.0\.|single_transformer_blocks\.0\."


def _bad_deeper_model(dims):
    width, mlp, num_double, num_single = dims
    layers = [*all_reference_layers(num_double, num_single), ("double", num_double + 3, "ff_a.0"),
              ("single", num_single, "proj_out")]
    refs = make_refs(layers, width, mlp, alpha=3.0)
    return kohya_state(refs, with_alpha=True), rf"transformer_blocks\.{num_double + 3}\.ff\.net\.0\.proj"


def _bad_diffusers_module(dims):
    width = dims[0]
    state = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, width),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(width, 2),
             "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(2, 16),  # an RMSNorm
             "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": torch.zeros(16, 2)}
    return state, r"transformer_blocks\.0\.attn\.norm_q"


def _bad_empty(dims):
    return {}, "no tensors"


BAD_CASES = {f.__name__.removeprefix("_bad_"): f for f in (
    _bad_unknown_layer, _bad_non_lora_key, _bad_kohya_unknown, _bad_missing_up, _bad_kohya_missing_down,
    _bad_rank_mismatch, _bad_fused_rows, _bad_wider_model, _bad_deeper_model, _bad_diffusers_module, _bad_empty,
)}


def assert_untouched(pipe, inputs, base) -> None:
    assert not getattr(pipe.transformer, "peft_config", {})
    assert not adapted_modules(pipe.transformer)
    assert torch.equal(forward(pipe.transformer, inputs), base)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_lora_is_refused_whole(case, fresh_pipe, dims, tmp_path):
    state, pattern = BAD_CASES[case](dims)
    path = save(state, tmp_path / "bad.safetensors")
    inputs = forward_inputs(fresh_pipe.transformer)
    base = forward(fresh_pipe.transformer, inputs)
    good, deltas = build_lora("diffsynth", "partial", dims)
    expected = forward(merged(fresh_pipe.transformer, (1.0, deltas)), inputs)
    with pytest.raises(LoraFormatError, match=pattern) as error:
        fresh_pipe.load_eligen_lora(path)
    assert isinstance(error.value, ValueError)
    assert_untouched(fresh_pipe, inputs, base)
    # nothing half-registered under the adapter name either: a good LoRA loads under it afterwards
    fresh_pipe.load_eligen_lora(save(good, tmp_path / "good.safetensors"))
    assert_forward_close(forward(fresh_pipe.transformer, inputs), expected, base)


def test_lora_after_fp8_is_refused_with_the_order_to_use(fresh_pipe, dims, tmp_path):
    """peft cannot wrap speedups.quantize_fp8's layers: the refusal says to load the LoRA first."""
    from eligen import speedups

    good, _ = build_lora("diffsynth", "partial", dims)
    speedups.quantize_fp8(fresh_pipe)
    with pytest.raises(LoraFormatError, match="load LoRAs first and quantise after"):
        fresh_pipe.load_eligen_lora(save(good, tmp_path / "good.safetensors"))
    assert not getattr(fresh_pipe.transformer, "peft_config", {})


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file", b"\x08\x00\x00\x00\x00\x00\x00\x00{"])
def test_unreadable_file_is_refused(content, fresh_pipe, tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    inputs = forward_inputs(fresh_pipe.transformer)
    base = forward(fresh_pipe.transformer, inputs)
    with pytest.raises(LoraFormatError, match=re.escape(str(path))):
        fresh_pipe.load_eligen_lora(path)
    assert_untouched(fresh_pipe, inputs, base)


def test_error_message_names_a_few_keys_not_all(dims):
    """Many bad keys: the message names some of them and says how many more, it does not dump the file."""
    state = {f"blocks.{i}.attn.nonsense{i}.weight": torch.zeros(1) for i in range(40)}
    with pytest.raises(LoraFormatError) as error:
        read_lora(state)
    message = str(error.value)
    assert "nonsense" in message and len(message) < 1000
    assert sum(f"nonsense{i}." in message for i in range(40)) < 40


# ----------------------------------------------------------------------------------------------------------
# 4. Round trips between the three formats
# ----------------------------------------------------------------------------------------------------------

SOURCE_CASES = ["diffsynth-default", "diffsynth", "kohya-alpha", "kohya", "diffusers"]


def round_trip_source(case: str, dims) -> dict[str, torch.Tensor]:
    width, mlp, num_double, num_single = dims
    if case == "diffusers":  # independent A per module, mixed ranks, some with alpha
        layers = [(kind, i, m) for kind, count, names in (("double", num_double, sorted(DOUBLE_MODULES)),
                                                          ("single", num_single, sorted(SINGLE_MODULES)))
                  for i in range(count) for m in names]
        return diffusers_state(make_mods(layers, width, mlp, ranks=(4, 2, 3), alphas=(None, 1.5, 8.0), seed=3))
    return build_lora(case, "all", dims, seed=3)[0]


@pytest.mark.parametrize("target", ["diffsynth", "kohya", "diffusers"])
@pytest.mark.parametrize("source", SOURCE_CASES)
def test_round_trip(source, target, dims):
    state = round_trip_source(source, dims)
    original, fmt = read_lora(state)
    assert fmt == EXPECTED_FORMAT[source]
    written = write_lora(original, target)
    again, fmt_again = read_lora(written)
    assert fmt_again == target
    assert set(again) == set(original)
    want, got = read_deltas(original), read_deltas(again)
    for name in original:
        torch.testing.assert_close(got[name], want[name], atol=DELTA_TOL, rtol=0, msg=name)
    if EXPECTED_FORMAT[source] == target:  # same format: the very same tensors come back
        for name, layer in original.items():
            assert torch.equal(again[name].down, layer.down), name
            assert torch.equal(again[name].up, layer.up), name
            assert again[name].scale == layer.scale, name


def test_round_trip_written_keys_follow_the_spec(dims):
    """What the writers produce is exactly the key set the spec names (checked with our own key builders)."""
    width, mlp, num_double, num_single = dims
    refs = make_refs(all_reference_layers(num_double, num_single), width, mlp, ranks=(4, 2), seed=5)
    weights, _ = read_lora(diffsynth_state(refs, default=False))
    assert set(write_lora(weights, "diffsynth")) <= set(diffsynth_state(refs, False)) | set(diffsynth_state(refs, True))
    assert set(write_lora(weights, "kohya")) == set(kohya_state(refs, with_alpha=True))
    peft_names = {f"transformer.{m}.lora_{ab}.weight" for m in ref_deltas(refs, width, mlp) for ab in "AB"}
    assert set(write_lora(weights, "diffusers")) == peft_names


def test_fusing_different_a_matrices_is_exact(dims):
    """A peft adapter whose q, k, v (and proj_mlp) have their own A, rank and alpha fuses block-diagonally."""
    width, mlp, *_ = dims
    layers = [("double", 0, "attn.to_q"), ("double", 0, "attn.to_k"), ("double", 0, "attn.to_v"),
              ("double", 1, "attn.add_q_proj"), ("double", 1, "attn.add_k_proj"), ("double", 1, "attn.add_v_proj"),
              ("single", 0, "attn.to_q"), ("single", 0, "attn.to_k"), ("single", 0, "attn.to_v"),
              ("single", 0, "proj_mlp")]
    mods = make_mods(layers, width, mlp, ranks=(4, 2, 3, 5), alphas=(None, 1.0, 6.0), seed=7)
    weights, _ = read_lora(diffusers_state(mods))
    want = mod_deltas(mods)
    for target in ("diffsynth", "kohya"):
        written = write_lora(weights, target)
        again, _ = read_lora(written)
        assert set(again) == set(want)
        got = read_deltas(again)
        for name, delta in want.items():
            torch.testing.assert_close(got[name], delta, atol=DELTA_TOL, rtol=0, msg=f"{target} {name}")


def test_partial_fused_group_gets_zero_rows(dims):
    """Only q and v of a fused q/k/v: written fused, k comes back with a zero update and q, v unchanged."""
    width, mlp, *_ = dims
    mods = make_mods([("double", 0, "attn.to_q"), ("double", 0, "attn.to_v")], width, mlp, ranks=(4, 2), seed=8)
    weights, _ = read_lora(diffusers_state(mods))
    want = mod_deltas(mods)
    for target in ("diffsynth", "kohya"):
        got = read_deltas(read_lora(write_lora(weights, target))[0])
        assert set(got) == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                            "transformer_blocks.0.attn.to_v"}
        assert torch.count_nonzero(got["transformer_blocks.0.attn.to_k"]) == 0
        for name, delta in want.items():
            torch.testing.assert_close(got[name], delta, atol=DELTA_TOL, rtol=0, msg=f"{target} {name}")


@pytest.mark.parametrize("module", ["proj_out", "x_embedder", "context_embedder", "norm_out.linear"])
@pytest.mark.parametrize("target", ["diffsynth", "kohya"])
def test_layer_without_reference_name_cannot_be_written(module, target, dims):
    width = dims[0]
    state = {f"transformer.{module}.lora_A.weight": torch.randn(2, width),
             f"transformer.{module}.lora_B.weight": torch.randn(width, 2),
             "transformer.transformer_blocks.0.ff.net.2.lora_A.weight": torch.randn(2, 4 * width),
             "transformer.transformer_blocks.0.ff.net.2.lora_B.weight": torch.randn(width, 2)}
    weights, _ = read_lora(state)
    with pytest.raises(LoraFormatError, match=re.escape(module)):
        write_lora(weights, target)
    assert set(read_lora(write_lora(weights, "diffusers"))[0]) == set(weights)  # diffusers keys can hold it


# ----------------------------------------------------------------------------------------------------------
# 5. The command line: `eligen lora info / convert`, `eligen generate --lora`
# ----------------------------------------------------------------------------------------------------------


def exit_code(argv) -> int:
    """main()'s return value, or the code of the SystemExit argparse raises."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def info_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def expand_ranges(text: str) -> set[int]:
    """'0-2, 5' -> {0, 1, 2, 5}; 'none' or '' -> set()."""
    out: set[int] = set()
    for part in re.split(r"[,\s]+", text.strip()):
        if not part or part == "none":
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def cli_lora(dims, tmp_path) -> tuple[Path, list[Ref]]:
    """A kohya file: double block 0 (img q/k/v, txt mlp_2), double block 1 (img mod), single block 1 (both)."""
    width, mlp, *_ = dims
    layers = [("double", 0, "attn.a_to_qkv"), ("double", 0, "ff_b.2"), ("double", 1, "norm1_a.linear"),
              ("single", 1, "to_qkv_mlp"), ("single", 1, "proj_out")]
    refs = make_refs(layers, width, mlp, ranks=(4, 2), alpha=2.5, seed=11)
    return save(kohya_state(refs, with_alpha=True), tmp_path / "kohya.safetensors"), refs


def test_lora_info(dims, tmp_path, capsys):
    path, _ = cli_lora(dims, tmp_path)
    assert exit_code(["lora", "info", path]) == 0
    fields = info_fields(capsys.readouterr().out)
    assert fields["format"] == "kohya"
    assert {int(r) for r in re.findall(r"\d+", fields["rank"])} == {2, 4}
    assert fields["alpha"] == "2.5"
    numbers = [int(n) for n in re.findall(r"\d+", fields["adapted layers"])]
    assert numbers[0] == 3 + 1 + 1 + 4 + 1 and 5 in numbers[1:]  # diffusers layers, then the 5 reference layers
    assert expand_ranges(fields["double blocks"]) == {0, 1}
    assert expand_ranges(fields["single blocks"]) == {1}

    width, mlp, *_ = dims
    refs = make_refs([("double", 1, "attn.b_to_out")], width, mlp, ranks=(3,))
    other = save(diffsynth_state(refs, default=True), tmp_path / "ds.safetensors")
    assert exit_code(["lora", "info", other]) == 0
    fields = info_fields(capsys.readouterr().out)
    assert fields["format"] == "diffsynth" and fields["rank"] == "3" and fields["alpha"] == "3"
    assert expand_ranges(fields["double blocks"]) == {1} and expand_ranges(fields["single blocks"]) == set()


@pytest.mark.parametrize("target", ["kohya", "diffsynth", "diffusers"])
def test_lora_convert(target, dims, tiny_pipeline_dir, tmp_path, capsys):
    source, refs = cli_lora(dims, tmp_path)
    out = tmp_path / "sub" / f"converted-{target}.safetensors"
    assert exit_code(["lora", "convert", source, out, "--to", target]) == 0
    assert out.exists()
    capsys.readouterr()
    assert exit_code(["lora", "info", out]) == 0
    assert info_fields(capsys.readouterr().out)["format"] == target

    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    inputs = forward_inputs(pipe.transformer)
    base = forward(pipe.transformer, inputs)
    expected = forward(merged(pipe.transformer, (1.0, ref_deltas(refs, dims[0], dims[1]))), inputs)
    pipe.load_eligen_lora(source)
    original = forward(pipe.transformer, inputs)
    assert_forward_close(original, expected, base)
    pipe.unload_lora_weights()
    assert pipe.load_eligen_lora(out) == target
    assert_forward_close(forward(pipe.transformer, inputs), original, base)


def test_lora_commands_bad_input(dims, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert exit_code(["lora", "info", missing]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err

    assert exit_code(["lora", "convert", missing, tmp_path / "o.safetensors", "--to", "kohya"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()

    source, _ = cli_lora(dims, tmp_path)
    assert exit_code(["lora", "convert", source, tmp_path / "o.safetensors", "--to", "comfy"]) == 2
    err = capsys.readouterr().err
    assert "--to" in err and "comfy" in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()

    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    assert exit_code(["lora", "info", text]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "Traceback" not in err

    # a layer that DiffSynth/kohya keys cannot name: refused, and no output file left behind
    width = dims[0]
    odd = save({"transformer.x_embedder.lora_A.weight": torch.randn(2, 16),
                "transformer.x_embedder.lora_B.weight": torch.randn(width, 2)}, tmp_path / "odd.safetensors")
    assert exit_code(["lora", "convert", odd, tmp_path / "odd-kohya.safetensors", "--to", "kohya"]) == 2
    err = capsys.readouterr().err
    assert "x_embedder" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*odd-kohya*"))


@pytest.fixture()
def simple_layout(tmp_path) -> Path:
    layout = {"prompt": "a red circle on a gray background", "width": 32, "height": 32, "seed": 3,
              "entities": [{"prompt": "a red circle", "box": [4, 4, 20, 20]}]}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_generate_with_lora_scale(simple_layout, tiny_pipeline_dir, dims, tmp_path, capsys):
    state, _ = build_lora("diffsynth-default", "all", dims, seed=13, strength=1.0)
    lora = save(state, tmp_path / "eligen.safetensors")
    fast = ["--model", tiny_pipeline_dir, "--steps", "2", "--max-sequence-length", "16", "--no-progress"]

    def render(name: str, *flags) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        assert exit_code(["generate", simple_layout, "-o", out, *fast, *flags]) == 0
        return pixels(out)

    plain = render("plain")
    half = render("half", "--lora", lora, "--lora-scale", "0.5")
    full = render("full", "--lora", lora, "--lora-scale", "1.0")
    assert np.abs(plain - half).max() > 2
    assert np.abs(full - half).max() > 2
    params = read_metadata(tmp_path / "half.png")["params"]
    assert params["lora"] == [str(lora)] and params["lora_scale"] == [0.5]

    capsys.readouterr()
    assert exit_code(["generate", simple_layout, "-o", tmp_path / "x.png", *fast, "--lora", lora,
                      "--lora-scale", "0.5", "--lora-scale", "0.7"]) == 2
    err = capsys.readouterr().err
    assert "--lora-scale" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------------------
# 6. Resolving a LoRA path, folder or hub id
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_download(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"no download expected: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_resolve_file_and_folder(tmp_path, no_download):
    file = tmp_path / "one" / "lora.safetensors"
    file.parent.mkdir()
    save({"x.lora_A.weight": torch.zeros(1, 1), "x.lora_B.weight": torch.zeros(1, 1)}, file)
    (file.parent / "README.md").write_text("not a LoRA")
    assert resolve_lora_path(file) == file
    assert resolve_lora_path(str(file.parent)) == file

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save({"x.lora_A.weight": torch.zeros(1, 1)}, two / name)
    with pytest.raises(LoraFormatError, match="2"):
        resolve_lora_path(two)
    assert resolve_lora_path(two, filename="b.safetensors") == two / "b.safetensors"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoraFormatError):
        resolve_lora_path(empty)


def test_hub_id_without_default_file(tmp_path, monkeypatch, no_download):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraFormatError, match="someone/some-lora"):
        resolve_lora_path("someone/some-lora")


def test_hub_id_default_file(tmp_path, monkeypatch, dims):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    state, _ = build_lora("diffsynth-default", "partial", dims)
    local = save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "downloaded.safetensors")
    calls = []

    def fake_download(repo_id, filename=None, **kwargs):
        calls.append((repo_id, filename))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_lora_path("modelscope/EliGen") == local
    assert calls == [("modelscope/EliGen", "model_bf16.safetensors")]
    assert resolve_lora_path("someone/some-lora", filename="x.safetensors") == local
    assert calls[-1] == ("someone/some-lora", "x.safetensors")


def test_top_level_layer_lora_wraps_only_that_layer(fresh_pipe, tmp_path):
    """A LoRA on the top-level proj_out must not also wrap every single block's proj_out (suffix matching)."""
    transformer = fresh_pipe.transformer
    out_features, in_features = transformer.proj_out.weight.shape
    state = {
        "transformer.proj_out.lora_A.weight": torch.randn(2, in_features),
        "transformer.proj_out.lora_B.weight": torch.randn(out_features, 2),
    }
    fresh_pipe.load_eligen_lora(save(state, tmp_path / "top.safetensors"))
    wrapped = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"proj_out"}


def test_path_like_name_is_not_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_lora_path("loras/missing.safetensors")
