"""The opt-in accelerators of eligen.speedups keep their promises on the tiny random FLUX: the first-block cache is
exact when it skips nothing, equals diffusers' own cached FluxPipeline without entities and keeps one state per
CFG branch; fp8 changes exactly the named linear layers, as ``x (s W_8)^T + b``; ``entity_steps`` and
``mask_only_in_blocks`` are exact at their ends and do what they say in between."""

from __future__ import annotations

import pytest
import torch

from eligen import EliGenPipeline, Entity, speedups

H, W, MSL, STEPS = 32, 32, 16, 4
ENTITIES = [Entity("a red circle", box=(0, 0, 16, 32)), Entity("a blue square", box=(12, 8, 32, 28))]


def run(pipe, entities=ENTITIES, **options) -> torch.Tensor:
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", height=H, width=W, num_inference_steps=STEPS,
                  true_cfg_scale=3.0, max_sequence_length=MSL, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    if entities is not None:
        kwargs["entities"] = entities
    return pipe(**kwargs, **options).images


@pytest.fixture(scope="module")
def exact(tiny_pipe):
    return run(tiny_pipe)


@pytest.fixture
def fresh_pipe(tiny_pipeline_dir):
    """A pipeline of its own: these tests change its modules."""
    pipe = EliGenPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def cached(tiny_pipe, stock_pipe):
    """Enable the cache on the session pipelines for one test, and take it off after."""
    yield
    for pipe in (tiny_pipe, stock_pipe):
        if pipe.transformer.is_cache_enabled:
            pipe.transformer.disable_cache()


# -- first-block cache ----------------------------------------------------------------------------------------------

def test_cache_threshold_zero_and_disabled_cache_are_exact(tiny_pipe, exact, cached):
    speedups.enable_first_block_cache(tiny_pipe, 0)
    assert torch.equal(run(tiny_pipe), exact)
    speedups.disable_step_cache(tiny_pipe)
    assert torch.equal(run(tiny_pipe), exact)


def test_cache_without_entities_equals_diffusers_cached_flux(tiny_pipe, stock_pipe, cached):
    plain = run(tiny_pipe, entities=None)
    for pipe in (tiny_pipe, stock_pipe):
        speedups.enable_first_block_cache(pipe, 1e3)  # every step after the first reuses the cache
    ours, stock = run(tiny_pipe, entities=None), run(stock_pipe, entities=None)
    assert torch.equal(ours, stock)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the cache did skip steps


def test_cache_keeps_one_state_per_cfg_branch(tiny_pipe, exact, cached):
    """With entities the positive branch's text is longer than the negative one's: shared state would mix them.
    With an infinite threshold each branch runs its whole network once (step 0) and reuses it after."""
    tail = tiny_pipe.transformer.single_transformer_blocks[-1].proj_out
    calls = []
    handle = tail.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    try:
        speedups.enable_first_block_cache(tiny_pipe, 1e3)
        out = run(tiny_pipe)
    finally:
        handle.remove()
    text = 3 * MSL  # two entity segments + the global prompt
    assert calls == [text + 64, MSL + 64]  # cond then uncond at step 0 only (64 image tokens)
    assert not torch.allclose(out, exact, atol=1e-3)


def test_cache_threshold_is_checked(tiny_pipe):
    with pytest.raises(ValueError, match="threshold"):
        speedups.enable_first_block_cache(tiny_pipe, -1)


# -- fp8 ------------------------------------------------------------------------------------------------------------

def test_fp8_changes_only_the_named_linear_layers(fresh_pipe):
    transformer = fresh_pipe.transformer
    before = dict(transformer.named_modules())
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    names = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp"]
    x = torch.randn(3, before[names[0]].in_features)
    weight, bias = before[names[0]].weight.detach().clone(), before[names[0]].bias.detach().clone()
    assert speedups.quantize_fp8(fresh_pipe, names) == names
    after = dict(transformer.named_modules())
    for name, module in after.items():
        if name in names:
            assert isinstance(module, speedups.Fp8Linear) and module.weight_fp8.dtype == torch.float8_e4m3fn
        elif name in before and not name.startswith(tuple(names)):
            assert module is before[name]
    for key, value in transformer.state_dict().items():
        if not key.startswith(tuple(names)):
            assert torch.equal(value, state[key]), key
    # an independent fp8 round trip: per-row scale max|w| / 448, then x (s W_8)^T + b
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    w8 = (weight / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.allclose(after[names[0]](x), x @ w8.T + bias, atol=1e-6)
    # e4m3: 3 mantissa bits, so each weight is within 1/16 of itself (plus the subnormal step of its row)
    assert ((after[names[0]].weight - weight).abs() <= weight.abs() / 16 + scale * 2**-9 + 1e-7).all()


def test_fp8_default_is_the_block_linears_and_runs_with_entities(fresh_pipe, exact):
    names = speedups.quantize_fp8(fresh_pipe)
    blocks = [n for n, m in fresh_pipe.transformer.named_modules() if isinstance(m, speedups.Fp8Linear)]
    assert sorted(blocks) == sorted(names) and all(n.split(".")[0].endswith("transformer_blocks") for n in names)
    for kept in ("x_embedder", "context_embedder", "proj_out"):
        assert isinstance(fresh_pipe.transformer.get_submodule(kept), torch.nn.Linear)
    out = run(fresh_pipe)
    relative = (out - exact).norm() / exact.norm()
    assert 0 < relative < 0.05, relative  # close to exact (fp8 rounding of every block), not equal


def test_fp8_under_a_lora_quantises_the_base_layers_and_keeps_the_lora(fresh_pipe):
    """With a LoRA loaded first, the default names are the wrapped base layers; the LoRA matrices stay in their
    precision and still add ``(alpha / r) B A x`` to the fp8 base's output."""
    from peft import LoraConfig

    transformer = fresh_pipe.transformer
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False))
    wrapped = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    base = wrapped.base_layer
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    names = speedups.quantize_fp8(fresh_pipe)
    assert "transformer_blocks.0.attn.to_q.base_layer" in names and not any(".lora_" in n for n in names)
    assert isinstance(wrapped.base_layer, speedups.Fp8Linear)
    assert all(isinstance(m, torch.nn.Linear) for m in (wrapped.lora_A["default"], wrapped.lora_B["default"]))
    x = torch.randn(3, weight.shape[1])
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    w8 = (weight / scale).to(torch.float8_e4m3fn).float() * scale
    lora = wrapped.lora_B["default"].weight @ wrapped.lora_A["default"].weight * (4 / 2)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), x @ (w8 + lora).T + bias, atol=1e-5)
    assert torch.isfinite(run(fresh_pipe)).all()


def test_fp8_refuses_a_name_that_is_not_a_linear(fresh_pipe):
    with pytest.raises(ValueError, match=r"'transformer_blocks\.0\.attn'"):
        speedups.quantize_fp8(fresh_pipe, ["transformer_blocks.0.attn"])
    with pytest.raises(ValueError, match="no module named 'nope'"):
        speedups.quantize_fp8(fresh_pipe, ["nope"])


# -- entities in some steps -----------------------------------------------------------------------------------------

def test_entity_steps_at_the_ends_are_exact_and_plain(tiny_pipe, stock_pipe, exact):
    assert torch.equal(run(tiny_pipe, entity_steps=STEPS), exact)
    assert torch.equal(run(tiny_pipe, entity_steps=0), run(stock_pipe, entities=None))
    assert torch.equal(run(tiny_pipe, entity_steps=0, entities_on_negative=True), run(stock_pipe, entities=None))


def test_entity_steps_runs_entities_first_then_the_global_prompt(tiny_pipe, exact):
    def trace(**options):
        seen = []
        out = run(tiny_pipe, callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"].clone()) or {},
                  **options)
        return seen, out

    exact_steps, _ = trace()
    steps, out = trace(entity_steps=2)
    assert torch.equal(steps[1], exact_steps[1])  # the first two steps are EliGen's
    assert not torch.allclose(out, exact, atol=1e-4)
    with pytest.raises(ValueError, match="entity_steps"):
        run(tiny_pipe, entity_steps=-1)


# -- the mask in some blocks ----------------------------------------------------------------------------------------

def test_mask_only_in_blocks_reaches_exactly_those_blocks(tiny_pipe, exact):
    names = speedups.transformer_block_names(tiny_pipe)
    assert names == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                     "single_transformer_blocks.1"]
    chosen = speedups.every_nth_block(tiny_pipe, 2)
    assert chosen == ["transformer_blocks.0", "single_transformer_blocks.0"]
    masked = {}  # block -> whether its first call (the positive branch's, step 0) got the mask

    def spy(name):
        def hook(module, args, kwargs):
            masked.setdefault(name, kwargs.get("attention_mask") is not None)
        return hook

    spies = [tiny_pipe.transformer.get_submodule(f"{n}.attn").register_forward_pre_hook(spy(n), with_kwargs=True)
             for n in names]
    hooks = speedups.mask_only_in_blocks(tiny_pipe, chosen)
    try:
        out = run(tiny_pipe)
    finally:
        hooks.remove()
        for spy in spies:
            spy.remove()
    assert masked == {n: n in chosen for n in names}
    assert not torch.allclose(out, exact, atol=1e-4)
    all_blocks = speedups.mask_only_in_blocks(tiny_pipe, names)
    try:
        assert torch.equal(run(tiny_pipe), exact)
    finally:
        all_blocks.remove()
    with pytest.raises(ValueError, match=r"no block named 'blocks\.0'"):
        speedups.mask_only_in_blocks(tiny_pipe, ["blocks.0"])


def test_qwen_image_entity_steps_and_cache(tiny_qwen_dir):
    """The same options on the other family: entity_steps=0 is the plain call, a zero-threshold cache is exact."""
    from eligen import EliGenQwenImagePipeline

    pipe = EliGenQwenImagePipeline.from_pretrained(tiny_qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    exact = run(pipe)
    assert torch.equal(run(pipe, entity_steps=0), run(pipe, entities=None))
    assert torch.equal(run(pipe, entity_steps=STEPS), exact)
    speedups.enable_first_block_cache(pipe, 0)
    assert torch.equal(run(pipe), exact)
    speedups.disable_step_cache(pipe)
    speedups.enable_first_block_cache(pipe, 1e3)
    assert not torch.allclose(run(pipe), exact, atol=1e-4)
