"""LoRA key formats (docs/design.md section 4): a random LoRA on the family's train targets survives every format the
family writes (each layer's update ``(alpha / r) B A`` unchanged), and once loaded into the pipeline every adapted
linear layer computes ``x (W + (alpha / r) B A)^T + b``, merged here by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from eligen.lora import FORMATS, LoraFormatError, LoraLayer, read_lora, save_state_dict, write_lora

RANK, ALPHA = 4, 8.0  # alpha != rank, so a dropped or doubled scale shows


def random_lora(transformer: torch.nn.Module, names: list[str], seed: int = 0) -> dict[str, LoraLayer]:
    """peft's LoRA on exactly ``names`` (of a copy of ``transformer``) with random A and non-zero random B."""
    model = copy.deepcopy(transformer)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=names, init_lora_weights="gaussian"))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    assert wrapped == sorted(names)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
            down.copy_(torch.randn(down.shape, generator=g) / math.sqrt(down.shape[1]))
            up.copy_(0.5 * torch.randn(up.shape, generator=g))
            weights[name] = LoraLayer(down.detach().clone(), up.detach().clone(), module.lora_alpha["default"])
    return weights


def update(layer: LoraLayer) -> torch.Tensor:
    """``(alpha / r) B A`` in float64, from the tensors (alpha None means r)."""
    rank = layer.down.shape[0]
    alpha = layer.alpha if layer.alpha is not None else rank
    return (alpha / rank) * (layer.up.double() @ layer.down.double())


@pytest.fixture
def lora(pipe, family):
    names = family.lora_train_names(pipe.transformer)
    assert names
    return random_lora(pipe.transformer, names)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_the_updates(lora, family_name, fmt):
    assert all(layer.alpha == ALPHA for layer in lora.values())
    try:
        state = write_lora(lora, fmt, family=family_name)
    except LoraFormatError:
        pytest.skip(f"{family_name} has no {fmt} form")
    read, detected = read_lora(state, family=family_name)
    assert detected == fmt
    assert sorted(read) == sorted(lora)
    for name, layer in lora.items():
        expected = update(layer)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(update(read[name]), expected, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_loaded_lora_is_the_hand_merge(tiny, family_name, lora, fmt, tmp_path):
    try:
        state = write_lora(lora, fmt, family=family_name)
    except LoraFormatError:
        pytest.skip(f"{family_name} has no {fmt} form")
    path = tmp_path / f"lora-{fmt}.safetensors"
    save_state_dict(state, path, fmt)
    pipe = tiny.fresh(family_name)  # this test's own: loading changes it
    original = copy.deepcopy(pipe.transformer)
    assert pipe.load_eligen_lora(path) == fmt
    transformer = pipe.transformer
    adapted = sorted(n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))
    assert adapted == sorted(lora)  # these layers and no others
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora.items():
            base = original.get_submodule(name)
            assert isinstance(base, torch.nn.Linear)
            x = torch.randn(2, 3, base.in_features, generator=g)
            merged = base.weight.double() + update(layer)
            bias = base.bias.double() if base.bias is not None else 0.0
            expected = x.double() @ merged.T + bias
            plain = x.double() @ base.weight.double().T + bias
            assert (expected - plain).abs().max() > 1e-2  # the update matters at this layer
            got = transformer.get_submodule(name)(x)
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5, msg=name)
