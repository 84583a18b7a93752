"""EliGenPipeline end to end on the tiny random FLUX (docs/design.md sections 2, 3, 9 and 10).

The tiny pipeline has VAE scale factor 2: one token = 4x4 pixels, so a 32x48 image has an 8x12 token grid
(n_img = 96) on a 16x24 latent grid. Every test restores the session-scoped pipelines' state it touches.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import eligen
import eligen.regional.sequence as eligen_pipeline
from eligen import Entity, LayoutError
from reference import reference_mask

H, W = 32, 48  # pixels
TOKENS_H, TOKENS_W = H // 4, W // 4
N_IMG = TOKENS_H * TOKENS_W  # 96
MSL = 16  # max_sequence_length
PROMPT = "a red circle"
NEGATIVE = "blurry"
# Boxes on even pixel coordinates (whole latent pixels), deliberately not aligned to the 4-pixel token grid.
BOX_A = (2, 2, 14, 10)
BOX_B = (20, 12, 46, 30)
ENTITIES = [Entity("a dog", box=BOX_A), Entity("a cat", box=BOX_B)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_kwargs(**overrides):
    kwargs = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, max_sequence_length=MSL,
                  output_type="latent")
    kwargs.update(overrides)
    return kwargs


@torch.no_grad()
def encode(pipe, prompt: str):
    """``(prompt_embeds, pooled)`` as the pipeline computes them (under no_grad: grad mode changes T5's kernels)."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=MSL)
    return prompt_embeds, pooled


@torch.no_grad()
def t5(pipe, prompts, max_sequence_length: int = MSL) -> torch.Tensor:
    return pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=max_sequence_length)


def packed_latents(seed: int, batch: int = 1) -> torch.Tensor:
    """Random packed latents ``(batch, n_img, 4 * C)`` for the tiny model (C = 4 latent channels)."""
    return torch.randn((batch, N_IMG, 16), generator=gen(seed))


def as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(im) for im in images])
    return np.asarray(images)


def assert_same_images(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    else:
        a_arr, b_arr = as_array(a), as_array(b)
        assert a_arr.shape == b_arr.shape and a_arr.dtype == b_arr.dtype
        assert np.array_equal(a_arr, b_arr)


@contextlib.contextmanager
def transformer_calls(pipe):
    """Record the keyword arguments of every transformer forward (one per CFG branch and step)."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append(dict(kwargs))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------------
# An independent reference for the token cover and the regional attention mask (docs/design.md section 2)
# --------------------------------------------------------------------------------------------------------------


def reference_cover(box) -> list[bool]:
    """Token cover of an even-aligned pixel box on the 32x48 image, by loops.

    A latent pixel (lx, ly) stands for pixels [2lx, 2lx+2) x [2ly, 2ly+2); with even box corners it is either fully
    inside or fully outside the box, so NEAREST resizing to the latent grid is unambiguous. A token (tx, ty) is
    covered if ANY of its 2x2 latent pixels is.
    """
    x0, y0, x1, y1 = box
    assert all(v % 2 == 0 for v in box)
    cover = []
    for ty in range(TOKENS_H):
        for tx in range(TOKENS_W):
            hit = False
            for dy in range(2):
                for dx in range(2):
                    lx, ly = 2 * tx + dx, 2 * ty + dy
                    if x0 <= 2 * lx and 2 * lx + 2 <= x1 and y0 <= 2 * ly and 2 * ly + 2 <= y1:
                        hit = True
            cover.append(hit)
    return cover


def test_reference_helpers_are_sane():
    cover_a = reference_cover(BOX_A)
    # BOX_A spans latent x [1, 7), y [1, 5): tokens x 0..3, y 0..2 (the ANY rule picks up the partial tokens)
    assert sum(cover_a) == 4 * 3
    assert cover_a[0] and cover_a[2 * TOKENS_W + 3] and not cover_a[3 * TOKENS_W] and not cover_a[4]
    mask = reference_mask([[True, False], [False, True]], 2, 1, 2)
    assert mask.shape == (1, 1, 7, 7)
    # image token 0 sees: entity 0 text, global, both image tokens; not entity 1
    assert mask[0, 0, 5].tolist() == [True, True, False, False, True, True, True]
    assert mask[0, 0, :, 5].tolist() == [True, True, False, False, True, True, True]
    assert mask[0, 0, 4].tolist() == [False, False, False, False, True, True, True]


# --------------------------------------------------------------------------------------------------------------
# 1. Zero entities == stock FluxPipeline
# --------------------------------------------------------------------------------------------------------------

ZERO_ENTITY_CASES = {
    "plain": {},
    "true_cfg": dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0),
    "batch": dict(prompt=[PROMPT, "a blue square"], num_images_per_prompt=2),
    "batch_true_cfg": dict(prompt=[PROMPT, "a blue square"], negative_prompt=[NEGATIVE, "ugly"], true_cfg_scale=2.0,
                           num_images_per_prompt=2),
    "pt": dict(output_type="pt"),
    "np": dict(output_type="np"),
    "pil": dict(output_type="pil"),
    "sigmas": dict(sigmas=[1.0, 0.7, 0.3], num_inference_steps=3),
    "guidance": dict(guidance_scale=1.0, num_inference_steps=3),
}


@pytest.mark.parametrize("case", list(ZERO_ENTITY_CASES))
def test_zero_entities_equal_stock(tiny_pipe, stock_pipe, case):
    kwargs = base_kwargs(**ZERO_ENTITY_CASES[case])
    ours = tiny_pipe(**kwargs, generator=gen(3)).images
    stock = stock_pipe(**kwargs, generator=gen(3)).images
    if kwargs["output_type"] == "pil":
        assert isinstance(ours, list) and isinstance(ours[0], Image.Image)
    assert_same_images(ours, stock)


def test_empty_entity_list_equals_stock(tiny_pipe, stock_pipe):
    kwargs = base_kwargs(negative_prompt=NEGATIVE, true_cfg_scale=3.0, output_type="np")
    ours = tiny_pipe(**kwargs, entities=[], generator=gen(4)).images
    stock = stock_pipe(**kwargs, generator=gen(4)).images
    assert_same_images(ours, stock)


def test_zero_entities_return_dict_false_equals_stock(tiny_pipe, stock_pipe):
    ours = tiny_pipe(**base_kwargs(), generator=gen(5), return_dict=False)
    stock = stock_pipe(**base_kwargs(), generator=gen(5), return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == 1
    assert torch.equal(ours[0], stock[0])


def test_callback_prompt_embeds_update_matches_stock(tiny_pipe, stock_pipe):
    def halve_prompt(pipe, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5}

    kwargs = base_kwargs(num_inference_steps=3, callback_on_step_end=halve_prompt,
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    ours = tiny_pipe(**kwargs, generator=gen(6)).images
    stock = stock_pipe(**kwargs, generator=gen(6)).images
    assert torch.equal(ours, stock)


def test_callback_latents_update_matches_stock(tiny_pipe, stock_pipe):
    def damp(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * 0.9}

    kwargs = base_kwargs(num_inference_steps=3, callback_on_step_end=damp)
    ours = tiny_pipe(**kwargs, generator=gen(7)).images
    stock = stock_pipe(**kwargs, generator=gen(7)).images
    assert torch.equal(ours, stock)


# --------------------------------------------------------------------------------------------------------------
# 2. Low-level path: precomputed embeddings, masks of any type and resolution, given latents
# --------------------------------------------------------------------------------------------------------------


def three_masks():
    """The same kind of layout as a PIL image (2x resolution), a uint8 array (latent resolution) and a float
    tensor (an odd 40x60 resolution)."""
    pil = np.zeros((64, 96), dtype=np.uint8)
    pil[8:40, 4:36] = 255
    array = np.zeros((16, 24), dtype=np.uint8)
    array[6:16, 12:24] = 200
    tensor = torch.zeros(40, 60)
    tensor[25:40, 0:20] = 1.0
    return [Image.fromarray(pil, mode="L"), array, tensor]


ENTITY_PROMPTS = ["a dog", "a cat", "a green tree"]


@pytest.mark.parametrize("cfg", [False, True])
def test_low_level_path_equals_high_level(tiny_pipe, cfg):
    pipe = tiny_pipe
    masks = three_masks()
    latents = packed_latents(11)
    prompt_embeds, pooled = encode(pipe, PROMPT)
    encoded = t5(pipe, ENTITY_PROMPTS, MSL)
    assert encoded.shape == (3, MSL, prompt_embeds.shape[-1])
    # every accepted shape: (T, D), (1, T, D), (1, T, D)
    entity_embeds = [encoded[0], encoded[1:2], encoded[2][None]]
    low_kwargs = dict(height=H, width=W, num_inference_steps=2, max_sequence_length=MSL, output_type="latent")
    high_kwargs = dict(low_kwargs)
    if cfg:
        neg_embeds, neg_pooled = encode(pipe, NEGATIVE)
        low_kwargs.update(negative_prompt_embeds=neg_embeds, negative_pooled_prompt_embeds=neg_pooled,
                          true_cfg_scale=3.0)
        high_kwargs.update(negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    low = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, entity_prompt_embeds=entity_embeds,
               entity_masks=masks, latents=latents.clone(), **low_kwargs).images
    high = pipe(prompt=PROMPT, entities=[Entity(p, mask=m) for p, m in zip(ENTITY_PROMPTS, masks, strict=True)],
                latents=latents.clone(), **high_kwargs).images
    assert low.shape == (1, N_IMG, 16)
    assert torch.equal(low, high)
    # the string form of the low level path is the same too
    by_strings = pipe(prompt=PROMPT, entity_prompts=ENTITY_PROMPTS, entity_masks=masks, latents=latents.clone(),
                      **high_kwargs).images
    assert torch.equal(by_strings, high)
    # and the entities matter here (the masks are not silently dropped)
    plain = pipe(prompt=PROMPT, latents=latents.clone(), **high_kwargs).images
    assert (plain - high).abs().max() > 1e-3


def test_low_level_latents_from_prepare_latents(tiny_pipe):
    pipe = tiny_pipe
    latents, _ = pipe.prepare_latents(1, 4, H, W, torch.float32, torch.device("cpu"), gen(12))
    assert latents.shape == (1, N_IMG, 16)
    from_latents = pipe(**base_kwargs(), entities=ENTITIES, latents=latents.clone()).images
    from_generator = pipe(**base_kwargs(), entities=ENTITIES, generator=gen(12)).images
    assert torch.equal(from_latents, from_generator)


# --------------------------------------------------------------------------------------------------------------
# 3. The regional mask reaches every attention call of every block, built once per call and branch
# --------------------------------------------------------------------------------------------------------------


class RecordingProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that logs ``(module name, attention_mask)`` for every call."""

    def __init__(self, log: list, names: dict[int, str]):
        super().__init__()
        self.log = log
        self.names = names

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        self.log.append((self.names[id(attn)], attention_mask))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@pytest.fixture
def recording(tiny_pipe):
    """Install a RecordingProcessor on every attention module; restore the original processors afterwards."""
    transformer = tiny_pipe.transformer
    originals = dict(transformer.attn_processors)
    names = {id(module): name for name, module in transformer.named_modules() if hasattr(module, "set_processor")}
    log: list = []
    transformer.set_attn_processor(RecordingProcessor(log, names))
    try:
        yield log, sorted(names.values())
    finally:
        transformer.set_attn_processor(dict(originals))
        assert all(p is originals[k] for k, p in transformer.attn_processors.items())


@pytest.fixture
def mask_builds(monkeypatch):
    """Count the calls of eligen.regional.sequence.regional_attention_mask (and keep what they returned)."""
    built: list[torch.Tensor] = []
    original = eligen_pipeline.regional_attention_mask

    def counting(*args, **kwargs):
        mask = original(*args, **kwargs)
        built.append(mask)
        return mask

    monkeypatch.setattr(eligen_pipeline, "regional_attention_mask", counting)
    return built


def split_branches(log, n_modules: int, steps: int, cfg: bool):
    """The log in call order: per step the positive forward (n_modules calls), then the negative one."""
    branches = 2 if cfg else 1
    assert len(log) == n_modules * steps * branches
    pos, neg = [], []
    for start in range(0, len(log), n_modules):
        chunk = log[start:start + n_modules]
        (neg if cfg and (start // n_modules) % 2 == 1 else pos).extend(chunk)
    return pos, neg


@pytest.mark.parametrize("cfg", [False, True])
def test_mask_reaches_every_attention_call(tiny_pipe, recording, mask_builds, cfg):
    log, module_names = recording
    config = tiny_pipe.transformer.config
    n_modules = config.num_layers + config.num_single_layers
    assert len(module_names) == n_modules
    steps = 3
    extra = dict(negative_prompt=NEGATIVE, true_cfg_scale=3.0) if cfg else {}
    with transformer_calls(tiny_pipe) as calls:
        tiny_pipe(**base_kwargs(num_inference_steps=steps, **extra), entities=ENTITIES, generator=gen(0))
    assert len(calls) == steps * (2 if cfg else 1)
    # the positive branch is the one whose text context carries the entity segments
    text_lengths = [c["encoder_hidden_states"].shape[1] for c in calls]
    expected_lengths = [3 * MSL, MSL] * steps if cfg else [3 * MSL] * steps
    assert text_lengths == expected_lengths

    pos, neg = split_branches(log, n_modules, steps, cfg)
    masked = [(name, m) for name, m in pos if m is not None]
    assert len(masked) == n_modules * steps
    for name in module_names:  # every double and single block, every step
        assert sum(1 for n, _ in masked if n == name) == steps
    size = 3 * MSL + N_IMG
    first = masked[0][1]
    assert first.shape == (1, 1, size, size) and first.dtype == torch.bool
    assert all(m is first for _, m in masked)  # one tensor for the whole generation
    assert len(mask_builds) == 1 and mask_builds[0] is first
    if cfg:
        assert len(neg) == n_modules * steps
        assert all(m is None for _, m in neg)


def test_entities_on_negative_reuses_the_mask(tiny_pipe, recording, mask_builds):
    log, _ = recording
    n_modules = len(tiny_pipe.transformer.attn_processors)
    steps = 2
    with transformer_calls(tiny_pipe) as calls:
        tiny_pipe(**base_kwargs(num_inference_steps=steps, negative_prompt=NEGATIVE, true_cfg_scale=3.0),
                  entities=ENTITIES, entities_on_negative=True, generator=gen(0))
    # negative prompt copied into every entity slot: both branches have 3 segments of MSL tokens
    assert [c["encoder_hidden_states"].shape[1] for c in calls] == [3 * MSL] * (2 * steps)
    neg_pooled = encode(tiny_pipe, NEGATIVE)[1]
    neg_context = t5(tiny_pipe, NEGATIVE, MSL)
    for c in calls[1::2]:
        assert torch.equal(c["pooled_projections"], neg_pooled)
        assert torch.equal(c["encoder_hidden_states"], torch.cat([neg_context] * 3, dim=1))
    pos, neg = split_branches(log, n_modules, steps, cfg=True)
    size = 3 * MSL + N_IMG
    assert len(pos) == len(neg) == n_modules * steps
    assert all(m is not None and m.shape == (1, 1, size, size) and m.dtype == torch.bool for _, m in pos + neg)
    assert len(mask_builds) == 1  # equal lengths: the positive mask serves both branches
    assert all(m is mask_builds[0] for _, m in pos + neg)


def test_entities_on_negative_with_different_lengths_builds_two_masks(tiny_pipe, recording, mask_builds):
    log, _ = recording
    n_modules = len(tiny_pipe.transformer.attn_processors)
    short = 8  # entity segments shorter than the global/negative prompt
    entity_embeds = list(t5(tiny_pipe, ["a dog", "a cat"], short))
    masks = [Entity("a dog", box=BOX_A).rasterize(W, H), Entity("a cat", box=BOX_B).rasterize(W, H)]
    tiny_pipe(**base_kwargs(num_inference_steps=1, negative_prompt=NEGATIVE, true_cfg_scale=3.0),
              entity_prompt_embeds=entity_embeds, entity_masks=masks, entities_on_negative=True, generator=gen(0))
    assert len(mask_builds) == 2
    pos, neg = split_branches(log, n_modules, 1, cfg=True)
    pos_size, neg_size = 2 * short + MSL + N_IMG, 3 * MSL + N_IMG
    assert all(m is mask_builds[0] and m.shape == (1, 1, pos_size, pos_size) for _, m in pos)
    assert all(m is mask_builds[1] and m.shape == (1, 1, neg_size, neg_size) for _, m in neg)


def test_no_entities_builds_no_mask(tiny_pipe, recording, mask_builds):
    log, _ = recording
    tiny_pipe(**base_kwargs(negative_prompt=NEGATIVE, true_cfg_scale=3.0), generator=gen(0))
    assert mask_builds == []
    assert log and all(m is None for _, m in log)


def test_mask_is_rebuilt_for_every_call(tiny_pipe, mask_builds):
    tiny_pipe(**base_kwargs(), entities=ENTITIES, generator=gen(0))
    tiny_pipe(**base_kwargs(), entities=ENTITIES[:1], generator=gen(0))
    assert len(mask_builds) == 2
    assert mask_builds[0].shape[-1] == 3 * MSL + N_IMG
    assert mask_builds[1].shape[-1] == 2 * MSL + N_IMG


# --------------------------------------------------------------------------------------------------------------
# 4. Entities change the output, and where they are matters
# --------------------------------------------------------------------------------------------------------------


def test_entities_change_the_output_and_position_matters(tiny_pipe):
    kwargs = base_kwargs(num_inference_steps=3)
    plain = tiny_pipe(**kwargs, generator=gen(21)).images
    left = tiny_pipe(**kwargs, entities=[Entity("a dog", box=(0, 0, 24, 32))], generator=gen(21)).images
    right = tiny_pipe(**kwargs, entities=[Entity("a dog", box=(24, 0, 48, 32))], generator=gen(21)).images
    again = tiny_pipe(**kwargs, entities=[Entity("a dog", box=(0, 0, 24, 32))], generator=gen(21)).images
    assert (left - plain).abs().max() > 1e-3
    assert (right - plain).abs().max() > 1e-3
    assert (left - right).abs().max() > 1e-3
    assert torch.equal(left, again)  # deterministic


def test_entity_prompt_matters(tiny_pipe):
    kwargs = base_kwargs()
    dog = tiny_pipe(**kwargs, entities=[Entity("a dog", box=BOX_B)], generator=gen(22)).images
    cat = tiny_pipe(**kwargs, entities=[Entity("a cat", box=BOX_B)], generator=gen(22)).images
    assert (dog - cat).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# 5. One true-CFG step against a manual reimplementation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entities_on_negative", [False, True])
def test_one_true_cfg_step_matches_manual(tiny_pipe, entities_on_negative):
    pipe = tiny_pipe
    scale, guidance_scale = 3.0, 3.5
    latents = packed_latents(31)
    prompt_embeds, pooled = encode(pipe, PROMPT)
    neg_embeds, neg_pooled = encode(pipe, NEGATIVE)
    entity_embeds = t5(pipe, [e.prompt for e in ENTITIES], MSL)
    covers = [reference_cover(e.box) for e in ENTITIES]
    mask = reference_mask(covers, MSL, MSL, N_IMG)

    img_ids = torch.tensor([[0.0, r, c] for r in range(TOKENS_H) for c in range(TOKENS_W)])
    guidance = torch.full((1,), guidance_scale)
    timestep = torch.ones(1)  # one step: sigma 1 -> t = 1000, passed as t / 1000

    def velocity(pooled_vec, context, attention_mask):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        with torch.no_grad():
            return pipe.transformer(
                hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=pooled_vec,
                encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3), img_ids=img_ids,
                joint_attention_kwargs=kwargs, return_dict=False,
            )[0]

    pos_context = torch.cat([entity_embeds[0:1], entity_embeds[1:2], prompt_embeds], dim=1)
    v_pos = velocity(pooled, pos_context, mask)
    if entities_on_negative:
        v_neg = velocity(neg_pooled, torch.cat([neg_embeds] * 3, dim=1), mask)
    else:
        v_neg = velocity(neg_pooled, neg_embeds, None)
    v = v_neg + scale * (v_pos - v_neg)
    expected = latents + (0.0 - 1.0) * v  # Euler step from sigma 1 to sigma 0

    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=scale, guidance_scale=guidance_scale,
               entities=ENTITIES, entities_on_negative=entities_on_negative, height=H, width=W,
               num_inference_steps=1, max_sequence_length=MSL, latents=latents.clone(), output_type="latent").images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # the mask matters in this comparison: no mask on the positive branch gives a different result
    v_unmasked = v_neg + scale * (velocity(pooled, pos_context, None) - v_neg)
    assert (latents - v_unmasked - out).abs().max() > 1e-4


def test_pipeline_mask_equals_reference_mask(tiny_pipe, mask_builds):
    tiny_pipe(**base_kwargs(num_inference_steps=1), entities=ENTITIES, generator=gen(0))
    expected = reference_mask([reference_cover(e.box) for e in ENTITIES], MSL, MSL, N_IMG)
    assert torch.equal(mask_builds[0], expected)


# --------------------------------------------------------------------------------------------------------------
# 6. Schedules
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 50])
def test_reference_sigmas(n):
    base = torch.linspace(1.0, 0.003 / 1.002, n, dtype=torch.float32)
    expected = (3.0 * base) / (1.0 + 2.0 * base)
    got = eligen.reference_sigmas(n)
    assert isinstance(got, list) and len(got) == n
    assert torch.equal(torch.tensor(got, dtype=torch.float32), expected)
    # and against the closed form in float64
    s64 = np.linspace(1.0, 0.003 / 1.002, n)
    np.testing.assert_allclose(got, 3 * s64 / (1 + 2 * s64), rtol=1e-6, atol=0)
    assert got[0] == 1.0


@pytest.fixture
def scheduler_steps(monkeypatch):
    """Record (sigmas, timestep) at every FlowMatchEulerDiscreteScheduler.step, whichever instance runs it."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = FlowMatchEulerDiscreteScheduler.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        seen.append((self.sigmas.clone(), torch.as_tensor(timestep).clone()))
        return original(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", step)
    return seen


def test_unshifted_sigmas_are_used_verbatim(tiny_pipe, scheduler_steps):
    sigmas = eligen.reference_sigmas(4)
    sig32 = torch.tensor(sigmas, dtype=torch.float32)
    with transformer_calls(tiny_pipe) as calls:
        tiny_pipe(**base_kwargs(num_inference_steps=4), sigmas=sigmas, shift_sigmas=False, entities=ENTITIES,
                  generator=gen(41))
    assert len(scheduler_steps) == 4
    expected_sigmas = torch.cat([sig32, torch.zeros(1)])
    for used, _ in scheduler_steps:
        assert torch.equal(used, expected_sigmas)
    timesteps = torch.stack([t.reshape(()) for _, t in scheduler_steps])
    assert torch.equal(timesteps, sig32 * 1000)
    passed = torch.stack([c["timestep"][0] for c in calls])
    torch.testing.assert_close(passed * 1000, sig32 * 1000, rtol=1e-6, atol=1e-4)
    # the pipeline's own scheduler is left as it was configured (dynamic shifting on)
    assert tiny_pipe.scheduler.config.use_dynamic_shifting


def test_unshifted_sigmas_differ_from_shifted(tiny_pipe):
    sigmas = eligen.reference_sigmas(3)
    verbatim = tiny_pipe(**base_kwargs(num_inference_steps=3), sigmas=sigmas, shift_sigmas=False, generator=gen(42))
    shifted = tiny_pipe(**base_kwargs(num_inference_steps=3), sigmas=sigmas, generator=gen(42))
    assert (verbatim.images - shifted.images).abs().max() > 1e-4


def test_shifted_reference_sigmas_equal_stock(tiny_pipe, stock_pipe, scheduler_steps):
    sigmas = eligen.reference_sigmas(4)
    kwargs = base_kwargs(num_inference_steps=4, sigmas=sigmas)
    ours = tiny_pipe(**kwargs, generator=gen(43)).images
    ours_sigmas = scheduler_steps[0][0]
    scheduler_steps.clear()
    stock = stock_pipe(**kwargs, generator=gen(43)).images
    assert torch.equal(ours, stock)
    assert torch.equal(ours_sigmas, scheduler_steps[0][0])
    assert not torch.allclose(ours_sigmas[:-1], torch.tensor(sigmas))  # the resolution-dependent shift applied


def test_shift_sigmas_false_needs_sigmas(tiny_pipe):
    with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError, match="sigmas"):
        tiny_pipe(**base_kwargs(), shift_sigmas=False, generator=gen(0))
    assert calls == []


# --------------------------------------------------------------------------------------------------------------
# 7. Attention backend guard
# --------------------------------------------------------------------------------------------------------------


def test_global_flash_backend_is_refused_before_denoising(tiny_pipe, monkeypatch):
    # flash-attn is not installed here, so set the registry directly (the context manager would refuse to enter)
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName.FLASH)
    with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError, match="'flash'"):
        tiny_pipe(**base_kwargs(), entities=ENTITIES, generator=gen(0))
    assert calls == []


def test_flash_backend_on_one_layer_is_refused(tiny_pipe, monkeypatch):
    processor = tiny_pipe.transformer.single_transformer_blocks[1].attn.processor
    monkeypatch.setattr(processor, "_attention_backend", AttentionBackendName.FLASH)
    with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError) as info:
        tiny_pipe(**base_kwargs(), entities=ENTITIES, generator=gen(0))
    assert "'flash'" in str(info.value)
    assert "single_transformer_blocks.1" in str(info.value)
    assert calls == []


def test_native_flash_backend_runs_without_entities_only(tiny_pipe, stock_pipe):
    """``_native_flash`` (torch SDPA flash kernel) runs on CPU but takes no mask: fine without entities only."""
    kwargs = base_kwargs()
    with attention_backend("_native_flash"):
        ours = tiny_pipe(**kwargs, generator=gen(51)).images
        stock = stock_pipe(**kwargs, generator=gen(51)).images
        with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError, match="_native_flash"):
            tiny_pipe(**kwargs, entities=ENTITIES, generator=gen(51))
        assert calls == []
    assert torch.equal(ours, stock)
    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE
    # state restored: entities work again
    tiny_pipe(**kwargs, entities=ENTITIES, generator=gen(51))


def test_processor_without_attention_mask_is_refused(tiny_pipe):
    class NoMaskProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
            raise AssertionError("must not run")

    transformer = tiny_pipe.transformer
    originals = dict(transformer.attn_processors)
    name = "transformer_blocks.1.attn.processor"
    processors = dict(originals)
    processors[name] = NoMaskProcessor()
    transformer.set_attn_processor(processors)
    try:
        with pytest.raises(ValueError, match="attention_mask"):
            tiny_pipe(**base_kwargs(), entities=ENTITIES, generator=gen(0))
    finally:
        transformer.set_attn_processor(dict(originals))
    assert transformer.attn_processors[name] is originals[name]


# --------------------------------------------------------------------------------------------------------------
# 8. Bad calls
# --------------------------------------------------------------------------------------------------------------


def test_entities_with_entity_masks_is_refused(tiny_pipe):
    masks = three_masks()[:2]
    with pytest.raises(ValueError, match="entities"):
        tiny_pipe(**base_kwargs(), entities=ENTITIES, entity_masks=masks, generator=gen(0))


def test_mismatched_entity_prompts_and_masks(tiny_pipe):
    with pytest.raises(ValueError, match="entity_masks"):
        tiny_pipe(**base_kwargs(), entity_prompts=["a dog", "a cat"], entity_masks=three_masks()[:1],
                  generator=gen(0))
    with pytest.raises(ValueError):
        tiny_pipe(**base_kwargs(), entity_prompts=["a dog"], generator=gen(0))
    with pytest.raises(ValueError):
        tiny_pipe(**base_kwargs(), entity_masks=three_masks()[:1], generator=gen(0))
    embeds = list(t5(tiny_pipe, ["a dog"], MSL))
    with pytest.raises(ValueError):
        tiny_pipe(**base_kwargs(), entity_prompt_embeds=embeds, entity_masks=three_masks(), generator=gen(0))


def test_box_covering_no_token_names_entity_and_field(tiny_pipe):
    # a 1x1 pixel box: inside the image, but NEAREST sampling of the 16x24 latent grid misses it
    entities = [Entity("a dog", box=BOX_A), Entity("a speck", box=(0, 0, 1, 1))]
    with transformer_calls(tiny_pipe) as calls, pytest.raises(LayoutError) as info:
        tiny_pipe(**base_kwargs(), entities=entities, generator=gen(0))
    assert info.value.entity == 1 and info.value.field == "box"
    assert "entity 1" in str(info.value) and "box" in str(info.value)
    assert calls == []


def test_empty_mask_names_entity_and_field(tiny_pipe):
    entities = [Entity("nothing", mask=np.zeros((H, W), dtype=bool))]
    with pytest.raises(LayoutError) as info:
        tiny_pipe(**base_kwargs(), entities=entities, generator=gen(0))
    assert info.value.entity == 0 and info.value.field == "mask"


def test_empty_entity_prompt_names_entity_and_field(tiny_pipe):
    with pytest.raises(LayoutError) as info:
        tiny_pipe(**base_kwargs(), entities=[ENTITIES[0], Entity("  ", box=BOX_B)], generator=gen(0))
    assert info.value.entity == 1 and info.value.field == "prompt"


def test_latents_for_another_size_are_refused_with_entities(tiny_pipe):
    latents = torch.randn((1, TOKENS_H * TOKENS_H, 16), generator=gen(0))  # a 32x32 image's tokens
    with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError, match="latents"):
        tiny_pipe(**base_kwargs(), entities=ENTITIES, latents=latents)
    assert calls == []


def test_bad_output_type(tiny_pipe):
    with transformer_calls(tiny_pipe) as calls, pytest.raises(ValueError, match="foo"):
        tiny_pipe(**base_kwargs(output_type="foo"), generator=gen(0))
    assert calls == []


def test_non_entity_in_entities(tiny_pipe):
    with pytest.raises(TypeError, match=r"entities\[1\]"):
        tiny_pipe(**base_kwargs(), entities=[ENTITIES[0], {"prompt": "a cat", "box": BOX_B}], generator=gen(0))


# --------------------------------------------------------------------------------------------------------------
# 9. Batches
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [False, True])
def test_batch_images_match_single_runs(tiny_pipe, cfg):
    prompts = [PROMPT, "a blue square"]
    per_prompt = 2
    negatives = [NEGATIVE, "ugly"]
    kwargs = dict(height=H, width=W, num_inference_steps=2, max_sequence_length=MSL, output_type="np",
                  true_cfg_scale=3.0 if cfg else 1.0)
    seeds = [100, 101, 102, 103]
    batch = tiny_pipe(prompt=prompts, negative_prompt=negatives if cfg else None, entities=ENTITIES,
                      num_images_per_prompt=per_prompt, generator=[gen(s) for s in seeds], **kwargs).images
    assert batch.shape == (4, H, W, 3)
    for p, prompt in enumerate(prompts):
        for k in range(per_prompt):
            i = p * per_prompt + k
            single = tiny_pipe(prompt=prompt, negative_prompt=negatives[p] if cfg else None, entities=ENTITIES,
                               generator=[gen(seeds[i])], **kwargs).images
            # batched matmuls may round differently from single ones; images are in [0, 1]
            np.testing.assert_allclose(batch[i], single[0], rtol=0, atol=1e-5)
    # the images are not all the same (generators and prompts differ)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    assert np.abs(batch[0] - batch[2]).max() > 1e-3


def test_batch_latents_match_single_runs(tiny_pipe):
    prompts = [PROMPT, "a blue square"]
    seeds = [200, 201, 202, 203]
    kwargs = base_kwargs(prompt=prompts, num_images_per_prompt=2)
    batch = tiny_pipe(**kwargs, entities=ENTITIES, generator=[gen(s) for s in seeds]).images
    assert batch.shape == (4, N_IMG, 16)
    for i, seed in enumerate(seeds):
        single = tiny_pipe(**base_kwargs(prompt=prompts[i // 2]), entities=ENTITIES, generator=gen(seed)).images
        torch.testing.assert_close(batch[i:i + 1], single, rtol=0, atol=1e-5)
