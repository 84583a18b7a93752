"""Training resumes bit for bit (docs/design.md section 6): a 4-step run equals a 2-step run continued with
``resume=True`` to 4 steps, in every loss and every LoRA tensor. The warm-up straddles the resume, so the LR
schedule's state has to come back too."""

from __future__ import annotations

import pytest
import torch

from eligen.tiny.toy_data import write_box_dataset
from eligen.train.trainer import train
from families.support import MAX_SEQUENCE_LENGTH
from training import lora_tensors, small_config


@pytest.fixture(scope="module")
def box_dataset(tmp_path_factory):
    return write_box_dataset(tmp_path_factory.mktemp("boxes"), 8, 32, 32, seed=1)


def test_a_resumed_run_equals_an_uninterrupted_one(tiny, family_name, box_dataset, tmp_path):
    model = tiny.directory(family_name)

    def config(folder: str, **overrides):
        return small_config(tmp_path / folder, model, box_dataset, checkpoint_every=2, warmup_steps=3,
                            max_sequence_length=MAX_SEQUENCE_LENGTH, **overrides)

    straight = train(config("a", max_steps=4))
    first = train(config("b", max_steps=2))
    halfway = lora_tensors(tmp_path / "b" / "out")
    resumed = train(config("b", max_steps=4, resume=True))
    assert len(straight.losses) == 4 and all(torch.isfinite(torch.tensor(straight.losses)))
    assert first.losses == straight.losses[:2]
    assert resumed.losses == straight.losses[2:]
    a, b = lora_tensors(tmp_path / "a" / "out"), lora_tensors(tmp_path / "b" / "out")
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(halfway[k], b[k]) for k in b)  # the last two steps changed the LoRA
