"""The attention op alone at FLUX.1-dev shapes: plain SDPA vs the regional mask in each exact form.

    python benchmarks/attention_op.py                    # CUDA: 24 heads x 128, 1024x1024 image, N=4 entities
    python benchmarks/attention_op.py --autotune         # also FlexAttention with mode='max-autotune'
    python benchmarks/attention_op.py --device cpu --heads 6 --iters 2   # CPU (fp32; no FlexAttention rows)

Prints ms per call, the ratio to plain (no entities, the ``[global | image]`` tokens only) and the largest
difference from the dense mask, for: dense bool SDPA, the reference's additive float mask, segmented attention
(eager and compiled) and, on CUDA, compiled FlexAttention with several kernel option sets, so each kernel can
be tuned without the rest of the transformer in the way. Writes the rows to JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed
from torch.nn.attention.flex_attention import flex_attention

from eligen.regional.dense import regional_attention_mask
from eligen.regional.flex import regional_block_mask
from eligen.regional.segmented import segmented_attention, segmented_mask

OPTION_SETS = {
    "default": None,
    "m128-n64-w8-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m128-n128-w8-s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m64-n64-w4-s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m128-n64-w4-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}


def rectangle_covers(n: int, side: int) -> torch.Tensor:
    """``(1, n, side * side)`` bool: overlapping rectangles, each about a quarter of the image (seeded)."""
    g = torch.Generator().manual_seed(0)
    cover = torch.zeros(1, n, side, side, dtype=torch.bool)
    for i in range(n):
        y, x = torch.randint(0, side // 2, (2,), generator=g).tolist()
        cover[0, i, y:y + side // 2, x:x + side // 2] = True
    return cover.view(1, n, side * side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heads", type=int, default=24, help="attention heads (FLUX.1: 24, each 128 wide)")
    parser.add_argument("--side", type=int, default=64, help="image tokens per side (FLUX.1 at 1024 px: 64)")
    parser.add_argument("--segment", type=int, default=512, help="tokens per prompt segment")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/attention_op.json"))
    parser.add_argument("--autotune", action="store_true", help="also try mode='max-autotune-no-cudagraphs'")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, seg, n_img = args.entities, args.segment, args.side**2
    cover = rectangle_covers(n, args.side).to(device)
    length = (n + 1) * seg + n_img
    q, k, v = (torch.randn(1, args.heads, length, 128, device=device, dtype=dtype) for _ in range(3))
    plain = [t[:, :, n * seg:].contiguous() for t in (q, k, v)]
    dense = regional_attention_mask(cover, [seg] * n, seg)
    additive = torch.zeros(dense.shape, device=device, dtype=dtype).masked_fill_(~dense, float("-inf"))
    grouped = segmented_mask(cover, [seg] * n, seg)
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D), the layout diffusers' backends take
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {dtype}, L={length} (plain {n_img + seg}), "
          f"mask density {dense.float().mean().item():.3f}")
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    compiled_segmented = torch.compile(segmented_attention)
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: F.scaled_dot_product_attention(*plain),
        "dense-bool": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
        "reference-float": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
        "segmented": lambda: segmented_attention(qs, ks, vs, grouped).transpose(1, 2),
        "segmented-compiled": lambda: compiled_segmented(qs, ks, vs, grouped).transpose(1, 2),
    }
    if device.type == "cuda":
        block = regional_block_mask(cover, [seg] * n, seg)
        print(f"  block sparsity {block.sparsity():.1f}%")
        modes = {"": torch.compile(flex_attention, dynamic=False)}
        if args.autotune:
            modes["autotune-"] = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
        for prefix, compiled in modes.items():
            for option_name, options in OPTION_SETS.items():
                if not (prefix and options is not None):
                    candidates[f"flex-{prefix}{option_name}"] = (
                        lambda c=compiled, o=options: c(q, k, v, block_mask=block, kernel_options=o))
    else:
        print("  FlexAttention rows: CUDA only (its CPU path is not the fused kernel)")
    rows, errors = {}, {}
    for row, fn in candidates.items():
        try:
            out = fn()
            errors[row] = (out - expected).abs().max().item() if out.shape == expected.shape else None
            rows[row] = timed(fn, device, min(args.iters, 3), args.iters)
        except Exception as exc:  # a kernel option set the kernel rejects must not lose the other rows
            print(f"  {row}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        error = "" if errors[row] is None else f"max |x - dense| {errors[row]:.3g}"
        print(f"  {row}: {rows[row]:.2f} ms {error}", flush=True)
    print("\n| attention | ms | x plain |\n|---|---|---|")
    for row, ms in rows.items():
        print(f"| {row} | {ms:.2f} | {ms / rows['plain']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": name, "entities": n, "length": length, "ms": rows,
                                     "max_abs_diff_from_dense": errors}, indent=1))


if __name__ == "__main__":
    main()
