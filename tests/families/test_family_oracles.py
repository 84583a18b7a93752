"""The suite's oracles against PIL and hand-worked examples, and every family's token grid against the oracle's.

The oracles (:mod:`families.oracles`) are written from the rules; these tests pin them down so that a mistake in an
oracle cannot hide a mistake in eligen.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from families import oracles
from families.support import ENTITY_MASKS, image_size, token_covers


def pil_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """What PIL's NEAREST resize makes of a bool mask drawn as an 8-bit image."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) >= 128


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 70), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_nearest_resize_samples_as_pil(src_h, src_w, dst_h, dst_w, seed):
    mask = np.random.default_rng(seed).random((src_h, src_w)) < 0.5
    assert np.array_equal(np.array(oracles.resize_nearest(mask, dst_h, dst_w)), pil_nearest(mask, dst_h, dst_w))


@pytest.mark.parametrize("source", [3, 7, 10, 40, 48, 49, 100, 129, 255])
def test_nearest_indices_equal_pil_on_every_target_size(source):
    """Every output size up to 3x the input: each output column reads the column PIL reads (a ramp image)."""
    ramp = Image.fromarray(np.arange(source, dtype=np.int32)[None], mode="I")
    for target in range(1, 3 * source + 1):
        pil = np.asarray(ramp.resize((target, 1), Image.Resampling.NEAREST))[0].tolist()
        assert oracles.nearest_indices(source, target) == pil, (source, target)


def test_latent_grid_keeps_whole_tokens_only():
    assert oracles.latent_grid(32, 32, 2, 2) == (16, 16)
    assert oracles.latent_grid(37, 45, 2, 2) == (18, 22)  # 37 // 4 = 9 tokens of 2 latent pixels
    assert oracles.latent_grid(1024, 768, 8, 2) == (128, 96)
    assert oracles.latent_grid(40, 40, 4, 3) == (9, 9)


def test_token_cover_by_hand():
    # an 8x8 image, f = 2, p = 2: a 4x4 latent grid, 2x2 tokens. NEAREST from 8 to 4 reads rows and columns
    # 1, 3, 5, 7 (PIL samples at the centre of each output pixel), so pixel (5, 2) falls between the samples.
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 2] = True
    assert oracles.token_cover(mask, 8, 8, 2, 2) == [False] * 4
    mask[5, 3] = True  # read by latent pixel (2, 1): token (1, 0), the third in row-major order
    assert oracles.latent_mask(mask, 8, 8, 2, 2)[2] == [False, True, False, False]
    assert oracles.token_cover(mask, 8, 8, 2, 2) == [False, False, True, False]
    # any one pixel of a token covers it; patch 3 makes 3x3 tokens
    latent = [[False] * 6 for _ in range(6)]
    latent[5][3] = True
    assert oracles.cover_of_latent(latent, 3) == [False, False, False, True]
    assert oracles.cover_of_latent(latent, 2) == [False] * 7 + [True, False]


def test_regional_mask_by_hand():
    covers, lengths, global_length, n_img, expected = oracles.HAND_EXAMPLE
    mask = oracles.regional_mask(covers, lengths, global_length, n_img)
    assert mask.dtype == bool and np.array_equal(mask, np.array(expected))
    # no entities: all true; an empty cover: the entity sees only itself
    assert oracles.regional_mask([], [], 2, 3).all()
    inert = oracles.regional_mask([[False, False]], [1], 1, 2)
    assert inert[0].tolist() == [True, False, False, False] and inert[:, 0].tolist() == [True, False, False, False]


def test_the_suite_entities_cover_tokens_apart(pipe):
    """The suite's entities each cover some tokens, no token is covered twice, and some tokens are uncovered: the
    layout the locality, inpainting and mask tests need, on this family's token grid."""
    covers = np.array(token_covers(pipe, ENTITY_MASKS))
    f, p = pipe.vae_scale_factor, pipe.family.patch_size
    h, w = oracles.latent_grid(*image_size(pipe), f, p)
    assert covers.shape == (len(ENTITY_MASKS), (h // p) * (w // p))
    assert covers.any(axis=1).all()
    assert (covers.sum(axis=0) <= 1).all()
    assert not covers.any(axis=0).all()
