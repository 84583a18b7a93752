"""What the family seam promises beyond the family-generic suite: each mask file decoded once per command, the
diffusers parent's checks kept, the pipelines' names resolved through the registry, the one defaults rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import eligen
from eligen import entities as entities_module
from eligen.cli import main
from eligen.families import FAMILIES, card, pipeline_class
from eligen.options import SamplingOptions, model_sampling_defaults, resolve_sampling

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_a_mask_file_is_decoded_once_per_generate_with_overlay(tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES / "masks", tmp_path / "masks")
    shutil.copy(EXAMPLES / "tiny_blob_mask.json", tmp_path / "layout.json")
    mask = tmp_path / "masks" / "tiny_blob.png"
    opened = []
    original = entities_module.open_image

    def counting(path, what="image"):
        opened.append(Path(path).resolve())
        return original(path, what)

    monkeypatch.setattr(entities_module, "open_image", counting)
    out = tmp_path / "out.png"
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(out), "--overlay", "--steps", "2",
                 "--no-progress"]) == 0
    assert opened.count(mask.resolve()) == 1  # read by the layout check, the pipeline, the overlay and the record
    mask.write_bytes(mask.read_bytes())  # the same bytes, a new modification time: read again, never stale
    out.unlink()
    assert main(["generate", str(tmp_path / "layout.json"), "-o", str(out), "--steps", "2", "--no-progress"]) == 0
    assert opened.count(mask.resolve()) == 2


def test_unequal_positive_and_negative_embeds_are_refused_as_the_parent_refuses(tiny_pipe, stock_pipe):
    """FluxPipeline raises when given positive and negative embeddings of different shapes under true CFG."""
    embeds, pooled, _ = stock_pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=16)
    shorter, short_pooled, _ = stock_pipe.encode_prompt("a dog", prompt_2=None, max_sequence_length=8)
    call = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=shorter,
                negative_pooled_prompt_embeds=short_pooled, true_cfg_scale=2.0, height=32, width=32,
                num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="must have the same shape") as stock:
        stock_pipe(**call)
    with pytest.raises(ValueError, match="must have the same shape") as ours:
        tiny_pipe(**call)
    assert str(ours.value) == str(stock.value)
    tiny_pipe(**{**call, "true_cfg_scale": 1.0})  # without true CFG the negative is unused, as in the parent


def test_the_pipeline_names_come_from_the_registry():
    for name in FAMILIES:
        cls = pipeline_class(name)
        assert getattr(eligen, card(name).pipeline_class_name) is cls
        assert cls.family.name == name and cls.family.card is card(name)
    assert set(eligen.__all__) >= {card(name).pipeline_class_name for name in FAMILIES}
    with pytest.raises(AttributeError):
        eligen.NoSuchPipeline  # noqa: B018


def test_declared_defaults_win_over_the_familys_and_given_options_over_both(tiny_pipeline_dir):
    tiny = model_sampling_defaults("eligen-tiny")
    assert (tiny["steps"], tiny["true_cfg"], tiny["max_sequence_length"]) == (20, 3.0, 32)  # its eligen_defaults.json
    plain = model_sampling_defaults(str(tiny_pipeline_dir))  # declares nothing: the family's reference settings
    assert (plain["steps"], plain["true_cfg"], plain["guidance"]) == (50, 3.0, 3.5)
    assert model_sampling_defaults(str(tiny_pipeline_dir), "diffusers")["true_cfg"] == 1.0  # FluxPipeline's own
    resolved = resolve_sampling(SamplingOptions(steps=7), tiny)
    assert resolved["steps"] == 7 and resolved["true_cfg"] == 3.0 and resolved["cfg_mode"] == "plain"


def test_the_python_api_keeps_the_diffusers_defaults_for_what_a_model_does_not_declare(tiny_pipe):
    steps = []
    tiny_pipe(prompt="a cat", height=32, width=32, max_sequence_length=16, output_type="latent",
              callback_on_step_end=lambda p, i, t, s: steps.append(i) or s, generator=torch.Generator().manual_seed(0))
    assert len(steps) == card("flux").defaults.steps == 28


@pytest.mark.parametrize("declared, named", [({"true_cfg": None}, "true_cfg"), ({"steps": "20"}, "steps"),
                                             ({"native_size": [64]}, "native_size"), ({"shift": 3}, "shift")])
def test_a_malformed_declared_default_is_named_with_its_file(tmp_path, declared, named):
    from eligen.models import DEFAULTS_FILE, model_defaults

    (tmp_path / DEFAULTS_FILE).write_text(json.dumps(declared))
    with pytest.raises(ValueError, match=rf"{DEFAULTS_FILE}.*'{named}'"):
        model_defaults(tmp_path)
