"""The suite's one mask oracle and one token-cover oracle, written from the rules (docs/design.md sections 2 and 11)
with plain Python loops over numpy arrays. Nothing here imports eligen, torch or PIL: the tests compare eligen
against these, and these against PIL (the NEAREST sampling) in ``test_family_oracles.py``.

Token cover of a pixel mask, for an image ``H x W``, VAE scale factor ``f`` and family patch size ``p``:

1. the latent grid is ``(h, w) = (p * (H // (f * p)), p * (W // (f * p)))``;
2. the mask is resized to ``(h, w)`` with nearest-neighbour sampling exactly as PIL's ``Image.resize(..., NEAREST)``
   samples (:func:`nearest_indices`);
3. a token, ``p x p`` latent pixels, row-major over the ``(h / p, w / p)`` grid, is covered if any of its pixels is.

Regional mask over ``[e_1 | ... | e_N | global | image]`` (True = may attend): image <-> image always; a text segment
sees only itself among the text segments (the global prompt included); entity i's text <-> image token z exactly when
entity i covers z, both directions; global text <-> every image token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def latent_grid(height: int, width: int, vae_scale_factor: int, patch: int) -> tuple[int, int]:
    """``(h, w)`` latent pixels of an ``height x width`` image: whole tokens only."""
    step = vae_scale_factor * patch
    return patch * (height // step), patch * (width // step)


def nearest_indices(source: int, target: int) -> list[int]:
    """The source index PIL's NEAREST resize reads for each of ``target`` output positions along one axis.

    Pillow (``_imaging.c: _resize`` -> ``Geometry.c: ImagingScaleAffine``) sets ``scale = source / target`` and
    walks the output with a running double ``x = scale / 2``, reading ``int(x)`` and then adding ``scale``: the
    running sum, not ``(i + 0.5) * scale``, so the rounding is PIL's to the last bit. An unchanged size is a copy.
    """
    if source == target:
        return list(range(target))
    scale = source / target
    position = scale * 0.5
    indices = []
    for _ in range(target):
        index = int(position) if position >= 0 else -1
        indices.append(min(max(index, 0), source - 1))
        position += scale
    return indices


def resize_nearest(mask: np.ndarray, height: int, width: int) -> list[list[bool]]:
    """A 2-D bool mask resized to ``height x width`` as PIL's NEAREST resize samples it."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"the oracles take (H, W) bool masks, got {mask.dtype} {mask.shape}")
    rows = nearest_indices(mask.shape[0], height)
    cols = nearest_indices(mask.shape[1], width)
    return [[bool(mask[r, c]) for c in cols] for r in rows]


def latent_mask(mask: np.ndarray, height: int, width: int, vae_scale_factor: int, patch: int) -> list[list[bool]]:
    """A pixel mask (any resolution) on the latent grid of an ``height x width`` image."""
    return resize_nearest(mask, *latent_grid(height, width, vae_scale_factor, patch))


def cover_of_latent(latent: list[list[bool]], patch: int) -> list[bool]:
    """A latent-grid mask -> one bool per token (row-major): covered if any of its ``patch x patch`` pixels is."""
    h, w = len(latent), len(latent[0]) if latent else 0
    cover = []
    for ty in range(h // patch):
        for tx in range(w // patch):
            hit = False
            for dy in range(patch):
                for dx in range(patch):
                    if latent[ty * patch + dy][tx * patch + dx]:
                        hit = True
            cover.append(hit)
    return cover


def token_cover(mask: np.ndarray, height: int, width: int, vae_scale_factor: int, patch: int) -> list[bool]:
    """The token cover of a pixel mask (any resolution) for an ``height x width`` image."""
    return cover_of_latent(latent_mask(mask, height, width, vae_scale_factor, patch), patch)


def latent_union(masks: Sequence[np.ndarray], height: int, width: int, vae_scale_factor: int,
                 patch: int) -> np.ndarray:
    """``(h, w)`` bool: the union of the masks on the latent grid."""
    h, w = latent_grid(height, width, vae_scale_factor, patch)
    union = np.zeros((h, w), dtype=bool)
    for mask in masks:
        latent = latent_mask(mask, height, width, vae_scale_factor, patch)
        for r in range(h):
            for c in range(w):
                union[r, c] = union[r, c] or latent[r][c]
    return union


def regional_mask(covers: Sequence[Sequence[bool]], entity_lengths: Sequence[int], global_length: int,
                  n_img: int) -> np.ndarray:
    """``(L, L)`` bool over ``[e_1 | ... | e_N | global | image]``, one (query, key) pair at a time.

    ``covers[i][z]``: entity ``i`` covers image token ``z``; ``entity_lengths[i]``: its segment's text tokens.
    """
    if len(covers) != len(entity_lengths):
        raise ValueError(f"{len(covers)} covers for {len(entity_lengths)} entity segments")
    # every position: ("entity", i), ("global", -1) or ("image", z)
    kinds: list[tuple[str, int]] = []
    for i, length in enumerate(entity_lengths):
        kinds += [("entity", i)] * length
    kinds += [("global", -1)] * global_length
    kinds += [("image", z) for z in range(n_img)]
    size = len(kinds)
    out = np.zeros((size, size), dtype=bool)
    for q in range(size):
        for k in range(size):
            (kind_q, id_q), (kind_k, id_k) = kinds[q], kinds[k]
            if kind_q == "image" and kind_k == "image":
                allowed = True
            elif kind_q != "image" and kind_k != "image":  # two text tokens: only within one segment
                allowed = kind_q == kind_k and id_q == id_k
            else:  # one text token and one image token, either way round
                text_kind, text_id, z = (kind_q, id_q, id_k) if kind_k == "image" else (kind_k, id_k, id_q)
                allowed = True if text_kind == "global" else bool(covers[text_id][z])
            out[q, k] = allowed
    return out


# A hand-worked mask: e_1 (2 tokens) covers image tokens 0, 1; e_2 (1 token) covers 1, 2; the global prompt has 1
# token; 3 image tokens. ``(covers, entity_lengths, global_length, n_img, expected (L, L) rows)``.
_T, _F = True, False
HAND_EXAMPLE = ([[_T, _T, _F], [_F, _T, _T]], [2, 1], 1, 3, [
    # e1 e1  e2  g  z0  z1  z2
    [_T, _T, _F, _F, _T, _T, _F],  # e1
    [_T, _T, _F, _F, _T, _T, _F],  # e1
    [_F, _F, _T, _F, _F, _T, _T],  # e2
    [_F, _F, _F, _T, _T, _T, _T],  # global
    [_T, _T, _F, _T, _T, _T, _T],  # z0
    [_T, _T, _T, _T, _T, _T, _T],  # z1
    [_F, _F, _T, _T, _T, _T, _T],  # z2
])
