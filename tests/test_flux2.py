"""EliGenFlux2Pipeline ([dev]) and EliGenFlux2KleinPipeline ([klein]) on the tiny random FLUX.2 pipelines
(docs/design.md section 17). The family-generic suite (tests/families) runs [dev]; this file adds [klein], the
independent reference and what is FLUX.2's own.

The tiny pipelines have VAE scale factor 2: a 32x32 image is an 8x8 token grid (n_img = 64). The reference is
written from the rules: every prompt encoded by the pipeline's own encoder padded to ``max_sequence_length``,
``[e_1 | ... | e_N | global | image]``, text positions ``(0, 0, 0, l)`` restarting at 0 in every segment, the mask
from the suite's oracle, attention as an explicit masked softmax in every double- and single-stream block; the stock
pipeline runs the loop around it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image

import eligen
from eligen import EliGenFlux2KleinPipeline, EliGenFlux2Pipeline, Entity
from eligen.families import model_card, model_family
from eligen.families.flux2.testing import save_tiny_klein_pipeline, save_tiny_pipeline
from families import oracles
from reference import reference_mask_segments

H = W = 32
N_IMG = (H // 4) * (W // 4)
MSL = 24  # text tokens per segment: the templates and the prompt fit
PROMPT = "a red circle on a gray background"
ENTITIES = [Entity("a dog", box=(2, 2, 14, 10)), Entity("a blue square", box=(16, 12, 30, 30))]
VARIANTS = ("dev", "klein")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kwargs(**overrides):
    base = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=2, max_sequence_length=MSL,
                output_type="latent")
    base.update(overrides)
    return base


def load(cls, path, **extra):
    pipe = cls.from_pretrained(path, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {"dev": save_tiny_pipeline(root / "dev"), "klein": save_tiny_klein_pipeline(root / "klein")}


@pytest.fixture(scope="module")
def pipes(dirs):
    """``{variant: (EliGen pipeline, stock pipeline)}`` on the same weights (call them, never change them)."""
    return {"dev": (load(EliGenFlux2Pipeline, dirs["dev"]), load(Flux2Pipeline, dirs["dev"])),
            "klein": (load(EliGenFlux2KleinPipeline, dirs["klein"]), load(Flux2KleinPipeline, dirs["klein"]))}


# -- zero entities: the stock pipelines ---------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["latent", "pt"])
@pytest.mark.parametrize("cfg", [{}, {"guidance_scale": 1.0}, {"guidance_scale": 2.5}],
                         ids=["default-cfg-4", "no-cfg", "cfg-2.5"])
def test_klein_zero_entities_equal_stock(pipes, cfg, output_type):
    ours, stock = pipes["klein"]
    mine = ours(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    theirs = stock(**kwargs(output_type=output_type, **cfg), generator=gen(1)).images
    assert mine.shape == theirs.shape and torch.equal(mine, theirs)
    if output_type == "latent":  # diffusers' [klein] returns the VAE's latents, unpacked and de-normalised
        assert mine.shape == (1, 4, H // 2, W // 2)


def test_dev_zero_entities_equal_stock_at_another_guidance(pipes):
    """[dev]'s guidance is embedded (no negative branch in diffusers); the generic suite runs its default 4."""
    ours, stock = pipes["dev"]
    mine = ours(**kwargs(guidance_scale=2.5), generator=gen(1)).images
    assert torch.equal(mine, stock(**kwargs(guidance_scale=2.5), generator=gen(1)).images)
    assert not torch.equal(mine, stock(**kwargs(), generator=gen(1)).images)


def test_klein_true_cfg_names_are_its_cfg(pipes):
    """EliGen's true_cfg_scale / negative_prompt (the commands' names) are [klein]'s CFG scale and negative."""
    ours, stock = pipes["klein"]
    by_name = ours(**kwargs(true_cfg_scale=2.5, negative_prompt=""), generator=gen(2)).images
    assert torch.equal(by_name, stock(**kwargs(guidance_scale=2.5), generator=gen(2)).images)
    other = ours(**kwargs(true_cfg_scale=2.5, negative_prompt="blurry"), generator=gen(2)).images
    assert not torch.equal(other, by_name)


def test_distilled_klein_runs_no_negative_branch(dirs, pipes):
    ours = load(EliGenFlux2KleinPipeline, dirs["klein"], is_distilled=True)
    stock = load(Flux2KleinPipeline, dirs["klein"], is_distilled=True)
    plain = pipes["klein"][0](**kwargs(guidance_scale=1.0), generator=gen(3)).images
    assert torch.equal(ours(**kwargs(), generator=gen(3)).images, stock(**kwargs(), generator=gen(3)).images)
    assert torch.equal(ours(**kwargs(), generator=gen(3)).images, plain)


# -- the reference ------------------------------------------------------------------------------------------------


def covers_of(entities) -> list[list[bool]]:
    """The oracle's token cover of each entity's box (VAE scale factor 2, 2x2 patches)."""
    return [oracles.token_cover(e.rasterize(W, H), H, W, 2, 2) for e in entities]


def masked_attention(q, k, v, rope, mask):
    """``(B, L, heads, d)`` query/key/value with the model's RoPE, as an explicit softmax over the keys ``mask``
    allows (None: all)."""
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)


class ReferenceDouble:
    """A double-stream block's attention written out (text first); the mask applies to the regional sequence."""

    def __init__(self, masks):
        self.masks = masks  # joint length -> mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(x):
            return x.unflatten(-1, (attn.heads, -1))

        text, image = encoder_hidden_states, hidden_states
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_q(heads(attn.to_q(image)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(image)))], 1)
        v = torch.cat([heads(attn.add_v_proj(text)), heads(attn.to_v(image))], 1)
        out = masked_attention(q, k, v, image_rotary_emb, self.masks.get(q.shape[1]))
        return attn.to_out[0](out[:, text.shape[1]:]), attn.to_add_out(out[:, :text.shape[1]])


class ReferenceSingle(ReferenceDouble):
    """A single-stream block's attention over ``[text | image]``, its MLP fused in the same projections."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = projected.split([3 * attn.inner_dim, projected.shape[-1] - 3 * attn.inner_dim], dim=-1)
        q, k, v = (x.unflatten(-1, (attn.heads, -1)) for x in qkv.chunk(3, dim=-1))
        out = masked_attention(attn.norm_q(q), attn.norm_k(k), v, image_rotary_emb, self.masks.get(q.shape[1]))
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def encode(stock, variant: str, prompt: str) -> torch.Tensor:
    """One prompt as the stock pipeline encodes it (its template and layers, padded to MSL): ``(1, MSL, 3 D)``."""
    if variant == "dev":
        return stock._get_mistral_3_small_prompt_embeds(stock.text_encoder, stock.tokenizer, prompt,
                                                        max_sequence_length=MSL)
    return stock._get_qwen3_prompt_embeds(stock.text_encoder, stock.tokenizer, prompt, max_sequence_length=MSL)


def reference_run(stock, variant, entities, seed, monkeypatch, **call):
    """The stock pipeline on the joined text, with reference positions and the reference attention everywhere."""
    segments = [encode(stock, variant, e.prompt) for e in entities] + [encode(stock, variant, PROMPT)]
    lengths = [s.shape[1] for s in segments]
    assert lengths == [MSL] * len(segments)  # padded like the global prompt
    text = sum(lengths)
    positions = [j for n in lengths for j in range(n)]  # every segment starts where the global prompt starts
    ids = torch.tensor([[0, 0, 0, p] for p in positions])
    original_ids = stock._prepare_text_ids
    monkeypatch.setattr(stock, "_prepare_text_ids",
                        lambda x, t_coord=None: ids[None].expand(x.shape[0], -1, -1) if x.shape[1] == text
                        else original_ids(x, t_coord))
    mask = reference_mask_segments(covers_of(entities), lengths[:-1], lengths[-1], N_IMG)
    masks = {text + N_IMG: mask}
    originals = dict(stock.transformer.attn_processors)
    stock.transformer.set_attn_processor({name: (ReferenceSingle if name.startswith("single") else ReferenceDouble)(
        masks) for name in originals})
    try:
        return stock(**kwargs(prompt=None, prompt_embeds=torch.cat(segments, dim=1), **call),
                     generator=gen(seed)).images
    finally:
        stock.transformer.set_attn_processor(originals)


@pytest.mark.parametrize("attention", ["dense", "flex", "segmented"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_entities_equal_the_reference(pipes, variant, attention, monkeypatch):
    ours, stock = pipes[variant]
    mine = ours(**kwargs(), entities=ENTITIES, attention=attention, generator=gen(4)).images
    expected = reference_run(stock, variant, ENTITIES, 4, monkeypatch)
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-5)
    plain = ours(**kwargs(), generator=gen(4)).images
    assert (mine - plain).abs().max() > 1e-3  # the entities matter


def spy(pipe, monkeypatch) -> list:
    """Every transformer call's text length and regional mask (or None), in order."""
    seen = []
    original = pipe.transformer.forward

    def forward(*args, **kw):
        seen.append((kw["encoder_hidden_states"].shape[1], (kw["joint_attention_kwargs"] or {}).get("attention_mask"),
                     kw["txt_ids"]))
        return original(*args, **kw)

    monkeypatch.setattr(pipe.transformer, "forward", forward)
    return seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_segments_are_padded_and_positions_restart(pipes, variant, monkeypatch):
    ours, _ = pipes[variant]
    seen = spy(ours, monkeypatch)
    ours(**kwargs(num_inference_steps=1, guidance_scale=1.0 if variant == "klein" else None), entities=ENTITIES,
         generator=gen(0))
    (length, mask, ids), = seen
    assert length == 3 * MSL and mask.shape == (1, 1, length + N_IMG, length + N_IMG)
    assert ids.tolist() == [[0, 0, 0, j] for _ in range(3) for j in range(MSL)]
    seen.clear()
    ours(**kwargs(num_inference_steps=1, guidance_scale=1.0 if variant == "klein" else None), generator=gen(0))
    (length, mask, ids), = seen
    assert mask is None and ids.tolist() == [[0, 0, 0, j] for j in range(MSL)]  # the stock pipeline's own


def test_each_cfg_branch_gets_the_mask_of_its_own_sequence(pipes, monkeypatch):
    """[klein]'s negative branch runs another prompt through the same attention kwargs: with a negative of another
    length and entities on the negative, each forward gets the mask of its own sequence; without, none."""
    ours, stock = pipes["klein"]
    negative = encode(stock, "klein", "")[:, :MSL // 2]  # a negative of another length
    seen = spy(ours, monkeypatch)
    ours(**kwargs(num_inference_steps=1, negative_prompt_embeds=negative), entities=ENTITIES,
         entities_on_negative=True, generator=gen(0))
    (cond_len, cond_mask, _), (neg_len, neg_mask, _) = seen
    assert (cond_len, neg_len) == (3 * MSL, 3 * (MSL // 2))
    assert cond_mask.shape[-1] == cond_len + N_IMG and neg_mask.shape[-1] == neg_len + N_IMG
    seen.clear()
    ours(**kwargs(num_inference_steps=1, negative_prompt_embeds=negative), entities=ENTITIES, generator=gen(0))
    (cond_len, cond_mask, _), (neg_len, neg_mask, _) = seen
    assert cond_mask.shape[-1] == 3 * MSL + N_IMG and neg_len == MSL // 2 and neg_mask is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_trimmed_entities_keep_their_real_tokens(pipes, variant):
    ours, _ = pipes[variant]
    full = ours.encode_entity_prompts(["a dog"], MSL)
    trimmed = ours.family.trim_entities(ours, full, ["a dog"], MSL)[0]
    real = ours.family.real_tokens(ours, ["a dog"], MSL)[0]
    assert trimmed.shape[1] == int(real.sum()) + 8 < MSL
    expected = full[0][:, -trimmed.shape[1]:] if variant == "dev" else full[0][:, :trimmed.shape[1]]  # pad side
    assert torch.equal(trimmed, expected)
    out = ours(**kwargs(guidance_scale=1.0 if variant == "klein" else None), entities=ENTITIES, entity_tokens="trim",
               generator=gen(0)).images
    assert torch.isfinite(out).all()


def test_the_calls_text_encoder_layers_reach_the_entities(pipes, monkeypatch):
    ours, stock = pipes["dev"]
    contexts = []
    original = ours._velocity
    monkeypatch.setattr(ours, "_velocity", lambda z, t, branch, g, guid: contexts.append(branch.context)
                        or original(z, t, branch, g, guid))
    ours(**kwargs(num_inference_steps=1, text_encoder_out_layers=(1, 2, 3)), entities=ENTITIES, generator=gen(0))
    expected = stock._get_mistral_3_small_prompt_embeds(stock.text_encoder, stock.tokenizer, "a dog",
                                                        max_sequence_length=MSL, hidden_states_layers=(1, 2, 3))
    assert torch.equal(contexts[0][:, :MSL], expected)


# -- options: the exact ones equal, the approximate ones run -------------------------------------------------------


def test_speed_options(pipes, dirs):
    from eligen.speedups import enable_first_block_cache, mask_only_in_blocks, transformer_block_names

    ours, _ = pipes["dev"]
    call = kwargs(negative_prompt="blurry", true_cfg_scale=3.0)  # [dev]'s opt-in true CFG: two branches
    exact = ours(**call, entities=ENTITIES, generator=gen(5)).images
    hooks = mask_only_in_blocks(ours, transformer_block_names(ours))  # the mask in every block: the same
    try:
        assert torch.equal(ours(**call, entities=ENTITIES, generator=gen(5)).images, exact)
    finally:
        hooks.remove()
    hooks = mask_only_in_blocks(ours, ["transformer_blocks.0"])
    try:
        assert not torch.equal(ours(**call, entities=ENTITIES, generator=gen(5)).images, exact)
    finally:
        hooks.remove()
    late = ours(**call, entities=ENTITIES, entity_steps=1, generator=gen(5)).images
    assert torch.isfinite(late).all() and not torch.equal(late, exact)
    compiled = load(EliGenFlux2Pipeline, dirs["dev"])
    with pytest.raises(ValueError, match=r"first-block cache is not available for FLUX\.2: .*single-stream"):
        enable_first_block_cache(compiled, 0.0)
    compiled.compile_transformer(backend="eager")  # dynamo traces both regional processors (fullgraph)
    one_step = kwargs(num_inference_steps=1)  # one branch, one step: each block kind traced once
    out = compiled(**one_step, entities=ENTITIES, attention="segmented", compile=True, generator=gen(5)).images
    torch.testing.assert_close(out, ours(**one_step, entities=ENTITIES, generator=gen(5)).images, atol=1e-5,
                               rtol=1e-5)


def test_reference_images_are_refused_by_name(pipes):
    rgb = np.zeros((H, W, 3), np.uint8)
    for variant in VARIANTS:
        with pytest.raises(ValueError, match=r"reference images.*inpaint=True"):
            pipes[variant][0](image=rgb, prompt=PROMPT, height=H, width=W, num_inference_steps=1)


def test_each_checkpoint_loads_its_own_pipeline_class(dirs):
    from eligen.pipelines import load_eligen_pipeline

    with pytest.raises(ValueError, match=r"\[klein\] checkpoint; load it with eligen\.EliGenFlux2KleinPipeline"):
        EliGenFlux2Pipeline.from_pretrained(dirs["klein"])
    with pytest.raises(ValueError, match=r"load it with eligen\.EliGenFlux2Pipeline$"):
        EliGenFlux2KleinPipeline.from_pretrained(dirs["dev"])
    assert type(load_eligen_pipeline(str(dirs["klein"]))) is EliGenFlux2KleinPipeline
    assert eligen.EliGenFlux2KleinPipeline is EliGenFlux2KleinPipeline
    assert model_family(dirs["klein"]) == model_family(dirs["dev"]) == "flux2"
    assert model_card("black-forest-labs/FLUX.2-klein-base-4B").pipeline_class_name == "EliGenFlux2KleinPipeline"
    assert model_card("black-forest-labs/FLUX.2-dev").pipeline_class_name == "EliGenFlux2Pipeline"
    assert model_family("black-forest-labs/FLUX.1-dev") == "flux"


# -- LoRA, and the commands -----------------------------------------------------------------------------------------


def test_the_kohya_form_is_the_one_diffusers_reads(pipes):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    from eligen.lora import LoraFormatError, LoraLayer, read_lora, write_diffusers, write_lora

    ours, _ = pipes["dev"]
    g = gen(9)
    names = [*ours.family.lora_train_names(ours.transformer), "x_embedder", "proj_out"]
    modules = dict(ours.transformer.named_modules())
    weights = {n: LoraLayer(torch.randn(2, modules[n].in_features, generator=g),
                            torch.randn(modules[n].out_features, 2, generator=g), 3.0) for n in names}
    kohya = write_lora(weights, "kohya", family="flux2")
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in kohya)
    theirs = _convert_kohya_flux2_lora_to_diffusers(dict(kohya))
    theirs = read_lora({k: v for k, v in theirs.items()})[0]
    assert sorted(theirs) == sorted(weights)
    for name, layer in weights.items():
        torch.testing.assert_close(theirs[name].delta(), layer.delta(), atol=1e-5, rtol=1e-5)
    again, fmt = read_lora(kohya, family="flux2")
    assert fmt == "kohya" and sorted(again) == sorted(weights)
    assert read_lora(write_diffusers(weights))[0].keys() == weights.keys()
    with pytest.raises(LoraFormatError, match="no diffsynth LoRA form"):
        write_lora(weights, "diffsynth", family="flux2")


def test_cli_end_to_end(dirs, tmp_path, capsys):
    from eligen.cli import main
    from eligen.generate import read_metadata
    from eligen.lora import load_state_dict, lora_info
    from eligen.tiny.toy_data import write_box_dataset

    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": PROMPT, "width": W, "height": H, "seed": 3,
                                  "entities": [{"prompt": "a dog", "box": [2, 2, 14, 10]},
                                               {"prompt": "a blue square", "box": [16, 12, 30, 30]}]}))
    fast = ["--steps", "2", "--max-sequence-length", str(MSL)]
    for variant in VARIANTS:
        out = tmp_path / f"{variant}.png"
        assert main(["generate", str(layout), "-o", str(out), "--model", str(dirs[variant]), *fast, "--overlay"]) == 0
        assert read_metadata(out)["params"]["model"] == str(dirs[variant])
        again = tmp_path / f"{variant}-again.png"
        assert main(["generate", "--from", str(out), "-o", str(again)]) == 0
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert read_metadata(tmp_path / "klein.png")["params"]["true_cfg"] == 4.0  # [klein]'s CFG, diffusers' default
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)).save(photo)
    inpainted = tmp_path / "inpainted.png"
    assert main(["inpaint", str(photo), str(layout), "-o", str(inpainted), "--model", str(dirs["dev"]), *fast]) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(inpainted))
    assert np.array_equal(before[:, :2], after[:, :2])  # the left edge lies outside both boxes: untouched
    data = write_box_dataset(tmp_path / "boxes", 4, W, H, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--model", str(dirs["dev"]), "--dataset", str(data), "--output-dir", str(run),
                 "--resolution", "32", "--rank", "4", "--max-steps", "3", "--batch-size", "2",
                 "--max-sequence-length", "16", "--no-buckets", "--no-progress"]) == 0
    assert {p.name for p in run.glob("eligen_lora*.safetensors")} == {"eligen_lora.safetensors",
                                                                       "eligen_lora_kohya.safetensors"}
    assert lora_info(load_state_dict(run / "eligen_lora.safetensors")).family == "flux2"
    capsys.readouterr()
    assert main(["lora", "info", str(run / "eligen_lora.safetensors")]) == 0
    assert "family: flux2" in capsys.readouterr().out
    pipe = load(EliGenFlux2Pipeline, dirs["dev"])
    for name in ("eligen_lora.safetensors", "eligen_lora_kohya.safetensors"):
        assert pipe.load_eligen_lora(run / name, adapter_name=name.split(".")[0]) in ("diffusers", "kohya")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square on a gray background\n")
    assert main(["data", "generate", str(captions), "--model", str(dirs["klein"]), "--out", str(tmp_path / "data"),
                 "--steps", "2", "--width", "32", "--height", "32", "--batch-size", "2"]) == 0
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == 2
