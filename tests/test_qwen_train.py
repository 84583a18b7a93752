"""`eligen train` on the tiny random Qwen-Image: the reference's recipe, padding-free batches of unequal prompt
lengths, and a resumed run that ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from eligen.families.qwen_image.model import QWEN_IMAGE, _qwen_mask
from eligen.lora import lora_info, read_lora
from eligen.tiny.toy_data import write_box_dataset
from eligen.train.trainer import Trainer, train
from training import lora_tensors
from training import small_config as config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_box_dataset(tmp_path_factory.mktemp("toy-qwen"), 8, 32, 32, seed=2)


def test_resumed_qwen_run_ends_identical(tmp_path, tiny_qwen_dir, dataset):
    straight = train(config(tmp_path / "a", tiny_qwen_dir, dataset, max_steps=6, checkpoint_every=3))
    first = train(config(tmp_path / "b", tiny_qwen_dir, dataset, max_steps=3, checkpoint_every=3))
    resumed = train(config(tmp_path / "b", tiny_qwen_dir, dataset, max_steps=6, checkpoint_every=3, resume=True))
    assert first.losses == straight.losses[:3] and resumed.losses == straight.losses[3:]
    a, b = lora_tensors(tmp_path / "a" / "out"), lora_tensors(tmp_path / "b" / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(torch.tensor(straight.losses)))


def test_the_reference_recipe(tmp_path, tiny_qwen_dir, dataset):
    trainer = Trainer(config(tmp_path, tiny_qwen_dir, dataset, rank=None))
    assert trainer.rank == 32
    adapted = {n.removesuffix(".lora_A.default") for n, _ in trainer.transformer.named_modules()
               if n.endswith(".lora_A.default")}
    expected = {f"transformer_blocks.{i}.{m}" for i in range(len(trainer.transformer.transformer_blocks))
                for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                          "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1",
                          "txt_mlp.net.2", "txt_mod.1")}
    assert adapted == expected
    schedule = QWEN_IMAGE.training_schedule()
    torch.testing.assert_close(trainer.schedule.sigmas, schedule.sigmas)
    assert schedule.sigmas[-1].item() == pytest.approx(0.02, abs=1e-6)  # the terminal level
    assert schedule.sigmas[0].item() == pytest.approx(1.0)
    assert schedule.weights.mean().item() == pytest.approx(1.0, abs=1e-4)


def test_unequal_prompt_lengths_are_masked_not_attended(tmp_path, tiny_qwen_dir, dataset):
    trainer = Trainer(config(tmp_path, tiny_qwen_dir, dataset, batch_size=2, drop_entities=0.0))
    batch = next(trainer.batches())
    batch["prompts"] = ["a dog", "a very long caption of a red square on a gray background"]
    _, _, branch, _ = trainer.encode_batch(batch)
    short = len(QWEN_IMAGE.encode_texts(trainer.pipe, ["a dog"], 16)[0][0])
    long = len(QWEN_IMAGE.encode_texts(trainer.pipe, [batch["prompts"][1]], 16)[0][0])
    assert short < long
    start = branch.context.shape[1] - long  # the global prompt's slot, padded to the longer one
    pads = slice(start + short, start + long)
    n_img = branch.attention_mask.shape[-1] - branch.context.shape[1]
    layer_mask = _qwen_mask(branch.attention_mask, branch.text_mask, n_img)  # what every attention layer applies
    assert not layer_mask[0, 0, :, pads].any()  # no token of sample 0 sees its padding
    assert layer_mask[1, 0, :, pads].any()
    assert not layer_mask[0, 0].sum(-1).eq(0).any()  # and no row is empty


def test_trained_lora_files_are_qwen_and_read_back(tmp_path, tiny_qwen_dir, dataset):
    result = train(config(tmp_path, tiny_qwen_dir, dataset, max_steps=2))
    reference = load_file(str(result.lora_files["diffsynth"]))
    assert all(k.startswith("transformer_blocks.") and ".default." in k for k in reference)  # the reference's form
    weights, _ = read_lora(reference)
    assert lora_info(reference).family == "qwen_image"
    diffusers, _ = read_lora(load_file(str(result.lora_files["diffusers"])))
    assert weights.keys() == diffusers.keys()
    for name in weights:
        torch.testing.assert_close(weights[name].delta(), diffusers[name].delta())
