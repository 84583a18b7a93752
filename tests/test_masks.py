"""The regional attention mask and the pixel mask -> token path against independent loop references.

The references are the suite's oracles (:mod:`families.oracles`, tests/families/oracles.py): written from
docs/design.md section 2 with plain Python loops, checked against PIL there, and never calling :mod:`eligen.masks`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eligen.masks import latent_grid_size, mask_tokens, resize_nearest, token_cover
from eligen.regional.dense import regional_attention_mask
from families import oracles

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_mask_properties(mask: torch.Tensor) -> None:
    for b in range(mask.shape[0]):
        m = mask[b, 0]
        assert bool(m.any(dim=-1).all()), "some query row attends to nothing"
        assert torch.equal(m, m.T), "the mask is not symmetric"


@st.composite
def layouts(draw):
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(0, 4))
    n_img = draw(st.integers(1, 20))
    lengths = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    global_length = draw(st.integers(1, 6))
    covers = []
    for _ in range(batch):
        item = []
        for _ in range(n):
            kind = draw(st.sampled_from(["random", "random", "empty", "full", "one"]))
            if kind == "random":
                cover = draw(st.lists(st.booleans(), min_size=n_img, max_size=n_img))
            elif kind == "empty":
                cover = [False] * n_img
            elif kind == "full":
                cover = [True] * n_img
            else:
                z = draw(st.integers(0, n_img - 1))
                cover = [i == z for i in range(n_img)]
            item.append(cover)
        covers.append(item)
    return covers, lengths, global_length, n_img


def _cover_tensor(covers: list[list[list[bool]]], n: int, n_img: int) -> torch.Tensor:
    if n == 0:
        return torch.zeros(len(covers), 0, n_img, dtype=torch.bool)
    return torch.tensor(covers, dtype=torch.bool)


@SETTINGS
@given(layouts())
def test_regional_attention_mask_matches_loop_reference(layout):
    covers, lengths, global_length, n_img = layout
    n = len(lengths)
    mask = regional_attention_mask(_cover_tensor(covers, n, n_img), lengths, global_length)
    size = sum(lengths) + global_length + n_img
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == (len(covers), 1, size, size)
    for b, item in enumerate(covers):
        expected = torch.from_numpy(oracles.regional_mask(item, lengths, global_length, n_img))
        assert torch.equal(mask[b, 0], expected), f"batch item {b} differs from the reference"
    _check_mask_properties(mask)


def test_regional_attention_mask_hand_written_example():
    covers, lengths, global_length, _, rows = oracles.HAND_EXAMPLE
    cover = torch.tensor([covers])
    expected = torch.tensor(rows)
    mask = regional_attention_mask(cover, lengths, global_length)
    assert tuple(mask.shape) == (1, 1, 7, 7)
    assert torch.equal(mask[0, 0], expected)


def test_regional_attention_mask_inert_entity_and_batch_items_differ():
    # Batch item 0: e_1 covers token 0, e_2 is empty (inert padding). Item 1: e_1 empty, e_2 covers everything.
    cover = torch.tensor([[[True, False], [False, False]], [[False, False], [True, True]]])
    T, F = True, False
    expected0 = torch.tensor([
        # e1 e2  g  z0 z1
        [T, F, F, T, F],  # e1
        [F, T, F, F, F],  # e2: sees only its own segment
        [F, F, T, T, T],  # global
        [T, F, T, T, T],  # z0
        [F, F, T, T, T],  # z1
    ])
    expected1 = torch.tensor([
        [T, F, F, F, F],  # e1: inert
        [F, T, F, T, T],  # e2
        [F, F, T, T, T],
        [F, T, T, T, T],
        [F, T, T, T, T],
    ])
    mask = regional_attention_mask(cover, [1, 1], 1)
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], expected1)


def test_regional_attention_mask_no_entities_is_all_true():
    mask = regional_attention_mask(torch.zeros(1, 0, 5, dtype=torch.bool), [], 3)
    assert tuple(mask.shape) == (1, 1, 8, 8)
    assert bool(mask.all())


# ----------------------------------------------------------------------------------------------------------
# Pixel mask -> latent grid -> token cover, against the suite's token-cover oracle (FLUX's 2x2 patch)
# ----------------------------------------------------------------------------------------------------------


@st.composite
def pixel_masks(draw):
    f = draw(st.sampled_from([1, 2, 4, 8]))
    height = draw(st.integers(2 * f, 2 * f * 7))
    width = draw(st.integers(2 * f, 2 * f * 7))
    mask_h = draw(st.integers(1, 48))
    mask_w = draw(st.integers(1, 48))
    density = draw(st.sampled_from([0.02, 0.1, 0.5, 0.9]))
    seed = draw(st.integers(0, 2**31 - 1))
    mask = np.random.default_rng(seed).random((mask_h, mask_w)) < density
    border = draw(st.sampled_from(["none", "top", "bottom", "left", "right", "corner"]))
    if border == "top":
        mask[0, :] = True
    elif border == "bottom":
        mask[-1, :] = True
    elif border == "left":
        mask[:, 0] = True
    elif border == "right":
        mask[:, -1] = True
    elif border == "corner":
        mask[-1, -1] = True
    return mask, height, width, f


@SETTINGS
@given(pixel_masks())
def test_mask_tokens_matches_pil_nearest_reference(case):
    mask, height, width, f = case
    h, w = oracles.latent_grid(height, width, f, 2)
    assert tuple(latent_grid_size(height, width, f)) == (h, w)
    tokens = mask_tokens(mask, height, width, f)
    assert tokens.dtype == torch.bool
    assert tuple(tokens.shape) == ((h // 2) * (w // 2),)
    assert tokens.tolist() == oracles.token_cover(mask, height, width, f, 2)


@SETTINGS
@given(pixel_masks())
def test_resize_nearest_matches_pil(case):
    mask, height, width, _ = case
    out = resize_nearest(mask, height, width)
    assert tuple(out.shape) == (height, width)
    assert np.asarray(out).tolist() == oracles.resize_nearest(mask, height, width)


@pytest.mark.parametrize(("height", "width", "f", "expected"), [
    (1024, 1024, 8, (128, 128)),
    (1000, 744, 8, (124, 92)),  # 1000 // 16 = 62, 744 // 16 = 46
    (1023, 1025, 8, (126, 128)),
    (32, 32, 2, (16, 16)),
    (35, 33, 2, (16, 16)),
    (7, 9, 1, (6, 8)),
    (64, 48, 4, (16, 12)),
])
def test_latent_grid_size_examples(height, width, f, expected):
    assert tuple(latent_grid_size(height, width, f)) == expected


@SETTINGS
@given(f=st.sampled_from([1, 2, 4, 8]), th=st.integers(1, 6), tw=st.integers(1, 6), data=st.data())
def test_one_latent_pixel_covers_exactly_one_token(f, th, tw, data):
    h, w = 2 * th, 2 * tw
    height, width = h * f, w * f
    r = data.draw(st.integers(0, h - 1))
    c = data.draw(st.integers(0, w - 1))
    expected = [False] * (th * tw)
    expected[(r // 2) * tw + c // 2] = True
    # A mask at the latent resolution with exactly one latent pixel on.
    latent = np.zeros((h, w), dtype=bool)
    latent[r, c] = True
    assert mask_tokens(latent, height, width, f).tolist() == expected
    # The same latent pixel drawn as an f x f block of the full-resolution image.
    full = np.zeros((height, width), dtype=bool)
    full[r * f:(r + 1) * f, c * f:(c + 1) * f] = True
    assert mask_tokens(full, height, width, f).tolist() == expected


def test_token_cover_hand_written_examples():
    latent = torch.zeros(4, 4, dtype=torch.bool)
    latent[0, 1] = True  # top-left token
    assert token_cover(latent).tolist() == [True, False, False, False]
    latent = torch.zeros(4, 4, dtype=torch.bool)
    latent[3, 2] = True  # bottom-right token (row 1, col 1 of the token grid)
    assert token_cover(latent).tolist() == [False, False, False, True]
    latent = torch.zeros(4, 4, dtype=torch.bool)
    latent[1, 2] = True  # token row 0, col 1: row-major index 1
    latent[2, 1] = True  # token row 1, col 0: row-major index 2
    assert token_cover(latent).tolist() == [False, True, True, False]
    # Non-square: 2 x 6 latent pixels -> 1 x 3 tokens.
    latent = torch.zeros(2, 6, dtype=torch.bool)
    latent[1, 5] = True
    assert token_cover(latent).tolist() == [False, False, True]
    # Tall: 6 x 2 latent pixels -> 3 x 1 tokens.
    latent = torch.zeros(6, 2, dtype=torch.bool)
    latent[2, 0] = True
    assert token_cover(latent).tolist() == [False, True, False]
    assert token_cover(torch.zeros(4, 4, dtype=torch.bool)).tolist() == [False] * 4
    assert token_cover(torch.ones(4, 6, dtype=torch.bool)).tolist() == [True] * 6


def test_token_cover_leading_dimensions():
    latent = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    latent[1, 2, 3, 3] = True
    latent[0, 0, 0, 2] = True
    out = token_cover(latent)
    assert tuple(out.shape) == (2, 3, 4)
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[1, 2, 3] = True
    expected[0, 0, 1] = True
    assert torch.equal(out, expected)


@SETTINGS
@given(th=st.integers(1, 5), tw=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_token_cover_matches_loop_reference(th, tw, seed):
    latent = np.random.default_rng(seed).random((2 * th, 2 * tw)) < 0.15
    expected = oracles.cover_of_latent(latent.tolist(), 2)
    assert token_cover(torch.from_numpy(latent)).tolist() == expected
