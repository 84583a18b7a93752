"""`eligen train` on edit records (docs/design.md section 21): the tiny random FLUX.1 Kontext and Qwen-Image-Edit-Plus
pipelines learn from (input image, edited image, instruction, entities) records made here, and a resumed run ends
where an uninterrupted one does. The pipelines' input sizes are made small as in their edit tests (a 32x32 input
stays 32x32: 64 reference tokens)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from PIL import Image

from eligen.families.flux import kontext
from eligen.families.flux.testing import save_tiny_kontext_pipeline
from eligen.families.qwen_image.testing import save_tiny_edit_pipeline
from eligen.train.data import EntityDataset
from eligen.train.trainer import Trainer, train
from training import lora_tensors
from training import small_config as config

SAVERS = {"kontext": save_tiny_kontext_pipeline, "qwen-edit": save_tiny_edit_pipeline}


@pytest.fixture(scope="module", autouse=True)
def small_inputs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 32)])
        patch.setattr(plus_module, "VAE_IMAGE_SIZE", 32 * 32)
        patch.setattr(plus_module, "CONDITION_IMAGE_SIZE", 56 * 56)
        yield


def write_records(root, edit: bool = True):
    """Two edit records: a random input, the edited image (a box repainted), the instruction, the box's entity."""
    rng = np.random.RandomState(0)
    lines = []
    for i, (box, colour) in enumerate([([4, 4, 20, 16], (255, 0, 0)), ([12, 8, 30, 30], (0, 0, 255))]):
        before = (rng.rand(32, 32, 3) * 255).astype(np.uint8)
        after = before.copy()
        after[box[1]:box[3], box[0]:box[2]] = colour
        Image.fromarray(before).save(root / f"in{i}.png")
        Image.fromarray(after).save(root / f"out{i}.png")
        record = {"image": f"out{i}.png", "prompt": "paint the box", "entities": [{"prompt": "a red square",
                                                                                     "box": box}]}
        lines.append(json.dumps({**record, **({"input_image": f"in{i}.png"} if edit else {})}))
    path = root / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("edits"))


@pytest.fixture(scope="module", params=list(SAVERS))
def edit_model(request, tmp_path_factory):
    return SAVERS[request.param](tmp_path_factory.mktemp(request.param) / "pipe")


def test_three_steps_on_edit_records_and_a_resume_from_step_two(tmp_path, edit_model, edits):
    straight = train(config(tmp_path / "a", edit_model, edits, checkpoint_every=2))
    assert len(straight.losses) == 3 and all(math.isfinite(loss) for loss in straight.losses)
    assert straight.lora_files["diffusers"].is_file()
    first = train(config(tmp_path / "b", edit_model, edits, max_steps=2, checkpoint_every=2))
    resumed = train(config(tmp_path / "b", edit_model, edits, checkpoint_every=2, resume=True))
    assert first.losses == straight.losses[:2] and resumed.losses == straight.losses[2:]
    a, b = lora_tensors(tmp_path / "a" / "out"), lora_tensors(tmp_path / "b" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_reference_tokens_are_the_pipelines_and_every_entity_sees_them(tmp_path, edit_model, edits):
    trainer = Trainer(config(tmp_path, edit_model, edits, drop_entities=0.0))
    batch = next(trainer.batches())
    x0, _, branch, reference = trainer.encode_batch(batch)
    assert reference is not None and reference.packed.shape == x0.shape  # 32x32 input: as many tokens as the image
    # the inference code path: a call's reference tokens for the same input
    pixels = batch["input_images"][0].permute(1, 2, 0).numpy()
    made = trainer.pipe.edit_reference(Image.fromarray(pixels), batch["prompts"][0], 1, trainer.device, torch.float32)
    assert torch.equal(made.packed[0], reference.packed[0])
    mask, sequence = branch.attention_mask, branch.sequence  # dense (B, 1, L, L) over [e_1 | global | image | ref]
    entity, image = sequence.slices()[0], slice(sequence.text_length, sequence.text_length + x0.shape[1])
    assert mask[:, :, entity, image.stop:].all()  # the entity's text sees every reference token
    assert not mask[:, :, entity, image].all()  # and only its box of the image
    loss, _, _ = trainer.loss(batch)
    assert torch.isfinite(loss)


def test_records_and_model_must_agree_on_editing(tmp_path, edits):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ValueError, match=r"line 1: no 'input_image'; an edit model learns from edit records"):
        EntityDataset(write_records(plain, edit=False), 32, multiple=4, edit=True)
    with pytest.raises(ValueError, match=r"line 1: an edit record \('input_image'\), but this model is not an edit"):
        EntityDataset(edits, 32, multiple=4)
    item = EntityDataset(edits, 32, multiple=4, edit=True)[0]
    assert item["input_image"].dtype == torch.uint8 and item["input_image"].shape == (3, 32, 32)
    before = np.asarray(Image.open(edits.parent / "in0.png"))
    assert np.array_equal(item["input_image"].permute(1, 2, 0).numpy(), before)  # the same crop as the image: none
    root = edits.parent  # the records' paths are relative to their file
    Image.new("RGB", (16, 32)).save(root / "narrow.png")
    narrow = {**json.loads(edits.read_text().splitlines()[0]), "input_image": "narrow.png"}
    (root / "mixed.jsonl").write_text(edits.read_text() + json.dumps(narrow) + "\n")
    dataset = EntityDataset(root / "mixed.jsonl", 32, multiple=4, edit=True, max_bad_fraction=0.5)
    assert len(dataset) == 2 and dataset.stats.reasons == {"input image of another size than the image": 1}


def test_validation_layouts_are_refused_on_an_edit_model(tmp_path, edit_model, edits):
    layout = tmp_path / "val.json"
    layout.write_text(json.dumps({"prompt": "paint it", "width": 32, "height": 32, "entities": []}))
    with pytest.raises(ValueError, match="is an edit model: the validation renders need an input image"):
        Trainer(config(tmp_path, edit_model, edits, validation_layouts=[str(layout)]))
