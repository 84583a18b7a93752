"""Independent, loop-based references written from DESIGN.md, shared by the tests (never by the library)."""

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
