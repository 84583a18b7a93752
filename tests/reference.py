"""Independent, loop-based references written from docs/design.md, shared by the tests (never by the library)."""

from __future__ import annotations

import torch


def reference_mask(covers: list[list[bool]], entity_len: int, global_len: int, n_img: int) -> torch.Tensor:
    """``(1, 1, L, L)`` bool mask for ``[e_1 | ... | e_N | global | image]`` built element by element."""
    n = len(covers)
    text_len = n * entity_len + global_len
    size = text_len + n_img

    def segment(index: int):
        if index < n * entity_len:
            return ("entity", index // entity_len)
        if index < text_len:
            return ("global", None)
        return ("image", index - text_len)

    rows = []
    for q in range(size):
        kind_q, id_q = segment(q)
        row = []
        for k in range(size):
            kind_k, id_k = segment(k)
            if kind_q == "image" and kind_k == "image":
                allowed = True
            elif kind_q != "image" and kind_k != "image":
                allowed = kind_q == kind_k and id_q == id_k
            else:
                text_kind, text_id, z = (kind_q, id_q, id_k) if kind_k == "image" else (kind_k, id_k, id_q)
                allowed = True if text_kind == "global" else covers[text_id][z]
            row.append(allowed)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)[None, None]


def reference_mask_segments(covers: list[list[bool]], entity_lengths: list[int], global_len: int,
                            n_img: int) -> torch.Tensor:
    """The same rule for segments of any lengths (Qwen-Image): ``(1, 1, L, L)`` bool, element by element."""
    owner = [i for i, n in enumerate(entity_lengths) for _ in range(n)] + ["global"] * global_len
    owner += [("image", z) for z in range(n_img)]

    def sees(a, b) -> bool:
        image_a, image_b = isinstance(a, tuple), isinstance(b, tuple)
        if image_a and image_b:
            return True
        if not image_a and not image_b:
            return a == b
        text, z = (a, b[1]) if image_b else (b, a[1])
        return True if text == "global" else covers[text][z]

    return torch.tensor([[sees(a, b) for b in owner] for a in owner], dtype=torch.bool)[None, None]


def read_deltas(weights) -> dict[str, torch.Tensor]:
    """Effective deltas of ``eligen.lora`` layers, computed from their tensors as (alpha / r) B @ A."""
    out = {}
    for name, layer in weights.items():
        rank = layer.down.shape[0]
        scale = (layer.alpha if layer.alpha is not None else rank) / rank
        out[name] = scale * layer.up.double() @ layer.down.double()
    return out
