"""Regional attention under diffusers' context parallelism (docs/design.md section 24).

(a) Two gloo processes: ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` plus
entities gives the single-device latents (tiny FLUX.1 and Qwen-Image). (b) The mask reordering on one process
against dense attention under the unsharded mask, the ranks simulated from the rules (split, concatenate text first,
all-to-all in rank order). (c) What cannot carry the mask is refused by name.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from eligen.regional import regional_attention_mask
from eligen.regional.parallel import (
    check_context_parallel,
    context_parallel_mask,
    gathered_mask,
    gathered_order,
    local_text_rope,
    ulysses_degree,
)

H, W = 32, 32  # 8x8 tokens: 64 image tokens, divisible by 2
STEPS = 2


def _cover(batch: int, n: int, n_img: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, n, n_img, generator=torch.Generator().manual_seed(seed)) > 0.5


def _sdpa(q, k, v, mask):
    """Dense attention of ``(B, L, H, D)`` under a bool ``(B, 1, Lq, Lk)`` mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("degree", [2, 4])
def test_ulysses_simulated_ranks_equal_the_unsharded_mask(degree):
    lengths, global_length, n_img, heads = [8, 4], 12, 32, 4
    text = sum(lengths) + global_length
    mask = regional_attention_mask(_cover(2, 2, n_img, 1), lengths, global_length)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, text + n_img, heads, 8, generator=g) for _ in range(3))
    expected = _sdpa(q, k, v, mask)

    # each rank: its text chunk then its image chunk (the _cp_plan's split, joined text first as the processors do)
    def local(x, r):
        return torch.cat([x[:, :text].chunk(degree, 1)[r], x[:, text:].chunk(degree, 1)[r]], dim=1)

    # Ulysses' all-to-all: every rank holds all positions, in rank order, for its H / W heads
    gathered = [torch.cat([local(x, r) for r in range(degree)], dim=1) for x in (q, k, v)]
    sharded = gathered_mask(mask, text, n_img, degree)
    out = torch.cat([_sdpa(*(x.chunk(degree, 2)[h] for x in gathered), sharded) for h in range(degree)], dim=2)
    # back to the ranks (all-to-all again), then to the single-device order
    per_rank = out.chunk(degree, dim=1)
    local_text = text // degree
    restored = torch.cat([torch.cat([p[:, :local_text] for p in per_rank], 1),
                          torch.cat([p[:, local_text:] for p in per_rank], 1)], dim=1)
    torch.testing.assert_close(restored, expected)
    assert not torch.equal(sharded, mask)  # the reordering is not the identity


def test_gathered_order_is_a_permutation_text_first_per_rank():
    order = gathered_order(4, 6, 2)
    assert order.tolist() == [0, 1, 4, 5, 6, 2, 3, 7, 8, 9]  # [text_0 | image_0 | text_1 | image_1]


def test_uneven_lengths_are_refused_by_name():
    with pytest.raises(ValueError, match="text tokens \\(5\\) into 2 equal parts"):
        gathered_order(5, 6, 2)
    with pytest.raises(ValueError, match="image tokens \\(9\\)"):
        gathered_order(4, 9, 2)


def _config(ring=1, ulysses=2, anything=False):
    return SimpleNamespace(context_parallel_config=SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses,
                                                                   ulysses_anything=anything))


def test_refusals_by_name():
    assert ulysses_degree(None) == 1
    with pytest.raises(ValueError, match="ring attention"):
        ulysses_degree(_config(ring=2, ulysses=1))
    with pytest.raises(ValueError, match="ulysses_anything"):
        ulysses_degree(_config(anything=True))
    with pytest.raises(ValueError, match=r"SimpleNamespace form .* attention='dense'"):
        context_parallel_mask(SimpleNamespace(), _config(), 4, 4)
    assert context_parallel_mask(None, _config(), 4, 4) is None
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    assert context_parallel_mask(mask, None, 4, 4) is mask
    transformer = SimpleNamespace(_parallel_config=_config())
    with pytest.raises(ValueError, match=r"not supported for FLUX\.2"):
        check_context_parallel(transformer, "dense", "FLUX.2", supported=False)
    with pytest.raises(ValueError, match=r"segmented form .* attention='dense'"):
        check_context_parallel(transformer, "segmented", "FLUX.1", supported=True)
    check_context_parallel(transformer, "dense", "FLUX.1", supported=True)
    check_context_parallel(SimpleNamespace(), "flex", "FLUX.2", supported=False)  # no parallelism: nothing to say


def test_families_that_declare_support():
    from eligen.families.flux.model import FLUX, FLUX_CONTROLNET, FLUX_KONTEXT
    from eligen.families.flux2.model import FLUX2
    from eligen.families.qwen_image.model import QWEN_IMAGE, QWEN_IMAGE_CONTROLNET

    assert FLUX.context_parallel and QWEN_IMAGE.context_parallel
    assert not any(f.context_parallel for f in (FLUX_KONTEXT, FLUX_CONTROLNET, QWEN_IMAGE_CONTROLNET, FLUX2))


def test_text_rope_without_parallelism_is_indexed():
    freqs = torch.randn(6, 3, dtype=torch.complex64)
    positions = torch.tensor([0, 1, 0, 1, 2, 3])
    assert torch.equal(local_text_rope(freqs, positions, None), freqs[positions])


# ---------------------------------------------------------------------------------------------------------------
# (a) two gloo processes against one
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(family: str, folder: str):
    from eligen import EliGenPipeline, EliGenQwenImagePipeline, Entity

    cls = EliGenPipeline if family == "flux" else EliGenQwenImagePipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    entities = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a cat", box=(14, 12, 30, 30))]
    kwargs = dict(max_sequence_length=16) if family == "flux" else {}
    return pipe, dict(prompt="a red circle on a blue background", entities=entities, height=H, width=W,
                      num_inference_steps=STEPS, output_type="latent", attention="dense",
                      generator=torch.Generator().manual_seed(0), **kwargs)


FAMILIES = ("flux", "qwen")


def _worker(rank: int, world: int, port: int, folders: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    # diffusers 0.42.1 places rank r on device r % torch.accelerator.device_count(), which is 0 on a CPU-only torch
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    from diffusers import ContextParallelConfig

    try:
        results = {}
        for family in FAMILIES:
            pipe, kwargs = _generate(family, folders[family])
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            results[family] = pipe(**kwargs).images
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one(tiny_pipeline_dir, tiny_qwen_dir, tmp_path):
    """FLUX.1 (text and image chunks joined per rank in double- and single-stream blocks) and Qwen-Image (text
    positions restarting per segment: the rotary table is gathered) under Ulysses degree 2."""
    folders = {"flux": str(tiny_pipeline_dir), "qwen": str(tiny_qwen_dir)}
    out = tmp_path / "latents.pt"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), folders, str(out)), nprocs=2)
    results = torch.load(out)
    for family in FAMILIES:
        pipe, kwargs = _generate(family, folders[family])
        torch.testing.assert_close(results[family], pipe(**kwargs).images, rtol=1e-4, atol=1e-5, msg=family)


def test_the_pipeline_refuses_what_cannot_carry_the_mask(tiny_pipe):
    """A transformer under context parallelism (its ``_parallel_config`` set): ``auto`` becomes dense, the segmented
    form is refused by name before any attention runs."""
    from eligen import Entity

    tiny_pipe.transformer._parallel_config = _config()
    try:
        assert tiny_pipe.attention_mode("auto", torch.device("cuda")) == "dense"
        with pytest.raises(ValueError, match=r"segmented form .* context parallelism"):
            tiny_pipe(prompt="a red circle", entities=[Entity("a dog", box=(2, 2, 14, 10))], height=H, width=W,
                      num_inference_steps=1, max_sequence_length=16, output_type="latent", attention="segmented")
    finally:
        tiny_pipe.transformer._parallel_config = None
