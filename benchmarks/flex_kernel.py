"""The attention op alone at FLUX.1-dev shapes: plain SDPA vs the regional mask (dense SDPA, FlexAttention).

    python benchmarks/flex_kernel.py                 # CUDA: 24 heads x 128, 1024x1024 image, N=4 entities

Prints ms per call and the ratio to plain (no entities, 4608 tokens) for dense bool SDPA, the reference's
additive float mask, and compiled FlexAttention with several kernel option sets, so the block-sparse kernel
can be tuned without the rest of the transformer in the way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from eligen.flex import regional_block_mask
from eligen.masks import regional_attention_mask

OPTION_SETS = {
    "default": None,
    "m128-n64-w8-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    "m128-n128-w8-s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m64-n64-w4-s3": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m128-n64-w4-s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=4)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/flex_kernel.json"))
    parser.add_argument("--autotune", action="store_true", help="also try mode='max-autotune-no-cudagraphs'")
    args = parser.parse_args()
    device, dtype, heads, dim, side, seg = "cuda", torch.bfloat16, 24, 128, 64, 512
    n = args.entities
    n_img = side * side
    g = torch.Generator().manual_seed(0)
    cover = torch.zeros(1, n, side, side, dtype=torch.bool)
    for i in range(n):  # overlapping rectangles, each about a quarter of the image
        y, x = torch.randint(0, side // 2, (2,), generator=g).tolist()
        cover[0, i, y:y + side // 2, x:x + side // 2] = True
    cover = cover.view(1, n, n_img).to(device)
    length = (n + 1) * seg + n_img
    q, k, v = (torch.randn(1, heads, length, dim, device=device, dtype=dtype) for _ in range(3))
    plain = [t[:, :, n * seg:].contiguous() for t in (q, k, v)]
    dense = regional_attention_mask(cover, [seg] * n, seg)
    additive = torch.zeros(dense.shape, device=device, dtype=dtype).masked_fill_(~dense, float("-inf"))
    block = regional_block_mask(cover, [seg] * n, seg)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, L={length} (plain {n_img + seg}), "
          f"mask density {dense.float().mean().item():.3f}, block sparsity {block.sparsity():.1f}%")
    rows = {"plain": timed(lambda: F.scaled_dot_product_attention(*plain)),
            "dense-bool": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)),
            "reference-float": timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive))}
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    modes = {"": torch.compile(flex_attention, dynamic=False)}
    if args.autotune:
        modes["autotune-"] = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    for prefix, compiled in modes.items():
        for name, options in OPTION_SETS.items():
            if prefix and options is not None:
                continue
            try:
                out = compiled(q, k, v, block_mask=block, kernel_options=options)
                error = (out - expected).abs().max().item()
                rows[f"flex-{prefix}{name}"] = timed(lambda c=compiled, o=options: c(q, k, v, block_mask=block,
                                                                                     kernel_options=o))
                print(f"  flex-{prefix}{name}: max |flex - dense| {error:.3g}", flush=True)
            except Exception as exc:  # an option set the kernel rejects must not lose the others
                print(f"  flex-{prefix}{name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    print("\n| attention | ms | x plain |\n|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {ms / rows['plain']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"entities": n, "length": length, "ms": rows}, indent=1))


if __name__ == "__main__":
    main()
