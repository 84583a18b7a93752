"""The rectified-flow training maths, against the rules of docs/design.md section 6 written out here."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from eligen.schedules import shifted_training_schedule as reference_schedule
from eligen.train.loss import batch_generator, flow_loss, noisy_latents, per_sample_loss, sample_sigmas


def test_reference_schedule_follows_the_rules():
    schedule = reference_schedule()
    assert schedule.sigmas.shape == schedule.weights.shape == (1000,)
    for i in (0, 1, 250, 999):
        s = 1 - i / 1000  # linspace(1, 0, 1001)[:-1]
        assert schedule.sigmas[i].item() == pytest.approx(3 * s / (1 + 2 * s), abs=1e-6)
    bell = [math.exp(-2 * ((1000 * s.item() - 500) / 1000) ** 2) for s in schedule.sigmas]
    low = min(bell)
    expected = [(b - low) * 1000 / sum(x - low for x in bell) for b in bell]
    torch.testing.assert_close(schedule.weights, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert schedule.weights.min().item() == pytest.approx(0.0, abs=1e-7)
    assert schedule.weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    peak = schedule.sigmas[schedule.weights.argmax()].item()
    assert abs(peak - 0.5) < 0.01  # the bell peaks at t = 500


def test_sampling_is_deterministic_and_in_range():
    schedule = reference_schedule()
    a = sample_sigmas(64, "reference", torch.Generator().manual_seed(1), schedule)
    b = sample_sigmas(64, "reference", torch.Generator().manual_seed(1), schedule)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[0].tolist()) <= set(schedule.sigmas.tolist())
    index = [schedule.sigmas.tolist().index(s) for s in a[0].tolist()]
    assert torch.equal(a[1], schedule.weights[index])
    sigmas, weights = sample_sigmas(4096, "logit_normal", torch.Generator().manual_seed(2))
    assert 0 < sigmas.min() and sigmas.max() < 1 and torch.equal(weights, torch.ones(4096))
    assert abs(sigmas.mean().item() - 0.5) < 0.02  # sigmoid of a standard normal is centred on 1/2
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_sigmas(2, "uniform", torch.Generator())


def test_each_global_batch_draws_from_its_own_seed():
    """The rule of docs/design.md section 6.1: seed = the first 8 bytes (little-endian) of
    sha256("eligen-batch:{seed}:{epoch}:{index}")."""
    def seed_of(seed, epoch, index):
        return int.from_bytes(hashlib.sha256(f"eligen-batch:{seed}:{epoch}:{index}".encode()).digest()[:8], "little")

    for key in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (7, 3, 12)]:
        assert batch_generator(*key).initial_seed() == seed_of(*key)
    draws = {key: torch.randn(4, generator=batch_generator(*key)) for key in [(0, 0, 1), (0, 1, 0), (1, 0, 0)]}
    assert len({tuple(d.tolist()) for d in draws.values()}) == 3  # neighbours do not share a stream
    torch.testing.assert_close(torch.randn(4, generator=batch_generator(0, 0, 1)), draws[0, 0, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch index must be >= 0"):
        batch_generator(0, 0, -1)


def test_noisy_latents_and_the_velocity_target():
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    # the exact velocity gives zero loss; the loss is the weighted mean of per-sample MSEs
    assert per_sample_loss(noise - x0, x0, noise).abs().max().item() == 0
    prediction = torch.zeros_like(x0)
    per_sample = per_sample_loss(prediction, x0, noise)
    torch.testing.assert_close(per_sample, ((noise - x0) ** 2).mean(dim=(1, 2)))
    weights = torch.tensor([0.0, 1.0, 2.0])
    torch.testing.assert_close(flow_loss(per_sample, weights), (per_sample * weights).mean())


def test_pixel_masks_to_covers_handles_empty_and_padded_entities():
    from eligen.masks import pixel_masks_to_covers

    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True  # the top-left token of a 2x2 token grid at VAE factor 2
    covers = pixel_masks_to_covers(masks, vae_scale_factor=2)
    assert covers.shape == (2, 2, 4)
    assert covers[0, 0].tolist() == [True, False, False, False] and not covers[0, 1].any() and not covers[1].any()
    assert pixel_masks_to_covers(torch.zeros(3, 0, 8, 8, dtype=torch.bool), 2).shape == (3, 0, 4)
