"""diffusers' CPU offloading works with entities: the outputs equal the non-offloaded ones.

``enable_model_cpu_offload(device="cpu")`` runs on any machine: accelerate's hooks are installed on every
component, run on every forward (the pipeline's execution device is read from them) and are re-armed by
``maybe_free_model_hooks`` after each call; only the weight moves are no-ops with the CPU as execution device.
diffusers names that device ``"cpu:0"``, and ``tensor.to("cpu:0")`` copies a tensor on ``"cpu"`` into a
contiguous one, so kernels see other strides: stock ``FluxPipeline``'s image moves by 8e-7 under model offload
too. These tests therefore allow float rounding (1e-5) where the copies happen, and demand equality where not.
``enable_sequential_cpu_offload`` is accelerate's ``cpu_offload`` on every component: the weights wait on the meta
device and each module's own weights are put in place for its forward only. diffusers names the CPU ``"cpu:0"``,
with which accelerate fails (also for stock ``FluxPipeline``), so on the CPU the same hooks are put on with
accelerate's ``cpu_offload`` and ``"cpu"``; that checks what sequential offloading asks of our code (no weight read
outside its module's forward: a weight read elsewhere is on the meta device). ``enable_sequential_cpu_offload``
itself runs where CUDA is.
"""

from __future__ import annotations

import pytest
import torch

from eligen import EliGenPipeline, EliGenQwenImagePipeline, Entity

H, W, MSL = 32, 32, 16
ENTITIES = [Entity("a red circle", box=(0, 0, 16, 32)), Entity("a blue square", box=(12, 8, 32, 28))]


def run(pipe, **options) -> torch.Tensor:
    out = pipe(prompt="a red circle", negative_prompt="blurry", entities=ENTITIES, height=H, width=W,
               num_inference_steps=3, true_cfg_scale=3.0, max_sequence_length=MSL, output_type="pt",
               generator=torch.Generator().manual_seed(0), **options).images
    return out.cpu()


def close(image: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding (the same call without its entities differs by about 0.15)."""
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def load(cls, path, device="cpu"):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@pytest.mark.parametrize("attention", ["dense", "segmented"])
def test_model_cpu_offload_equals_no_offload(tiny_pipeline_dir, attention):
    pipe = load(EliGenPipeline, tiny_pipeline_dir)
    expected = run(pipe, attention=attention, entities_on_negative=True)
    pipe.enable_model_cpu_offload(device="cpu")
    models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(pipe._all_hooks) == len(models) == 4 and all(hasattr(m, "_hf_hook") for m in models)
    for _ in range(2):  # the second call runs on the hooks maybe_free_model_hooks re-armed
        close(run(pipe, attention=attention, entities_on_negative=True), expected)


def test_model_cpu_offload_equals_no_offload_qwen_image(tiny_qwen_dir):
    pipe = load(EliGenQwenImagePipeline, tiny_qwen_dir)
    expected = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")
    close(run(pipe), expected)


def sequential_hooks(pipe) -> None:
    """What ``enable_sequential_cpu_offload`` does, with ``"cpu"`` as the execution device."""
    from accelerate import cpu_offload

    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_sequential_offload_hooks_equal_no_offload(tiny_pipeline_dir, tiny_qwen_dir, family):
    cls, path = (EliGenPipeline, tiny_pipeline_dir) if family == "flux" else (EliGenQwenImagePipeline, tiny_qwen_dir)
    pipe = load(cls, path)
    expected = {mode: run(pipe, attention=mode, entities_on_negative=True) for mode in ("dense", "segmented")}
    sequential_hooks(pipe)
    assert next(pipe.transformer.parameters()).device.type == "meta"
    assert pipe._execution_device == torch.device("cpu")
    for mode, image in expected.items():
        assert torch.equal(run(pipe, attention=mode, entities_on_negative=True), image), mode
    assert next(pipe.transformer.parameters()).device.type == "meta"  # and back after the call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential offload needs an accelerator (CUDA)")
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cuda_offload_equals_no_offload(tiny_pipeline_dir, offload):
    pipe = load(EliGenPipeline, tiny_pipeline_dir, "cuda")
    expected = run(pipe)
    pipe = load(EliGenPipeline, tiny_pipeline_dir)
    getattr(pipe, offload)(device="cuda")
    assert torch.allclose(run(pipe), expected, atol=1e-6)
    if offload == "enable_sequential_cpu_offload":
        assert next(pipe.transformer.parameters()).device.type == "meta"
