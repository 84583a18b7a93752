"""Z-Image (diffusers ``ZImagePipeline``, ``ZImageTransformer2DModel``): EliGen on a single-stream DiT whose text is
refined on its own first (docs/design.md section 18).

- every entity prompt is encoded alone exactly as the global prompt (Qwen3 chat template, second-to-last hidden
  state, the real tokens only); inside the transformer every segment, entities and global alike, is padded on its
  own to a multiple of 32 with the learned, attended ``cap_pad_token``, as the model pads its global prompt;
- the text positions restart for every segment at the global prompt's first position (1), and the image's
  positions start after the longest padded segment (the model puts them after its padded caption);
- the context refiner (text alone) runs each segment apart, so no segment reads another before the main layers;
  the main layers, image and text in one stream, take the regional mask (:mod:`eligen.regional.rule`) over
  ``[e_1 | ... | e_N | global | image]`` with each segment's padding counted as its own tokens and the image's
  padding tokens as uncovered image tokens;
- the transformer takes spatial latents and a flipped time (``1 - sigma``) and predicts ``x0 - noise``:
  :meth:`ZImageFamily.forward` takes packed latents and the noise level and returns the velocity ``noise - x0``,
  what the scheduler step and the shared loop expect; the pipeline gives the exact time the stock loop computes.

With no entities the forward is the stock transformer's, so every step is stock ZImagePipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor
from diffusers.utils.torch_utils import get_module_execution_device
from torch.nn.utils.rnn import pad_sequence

from ...regional.flex import BlockMask
from ...regional.processors import RegionalProcessor, attend
from ...regional.segmented import SegmentedMask
from ...regional.sequence import TokenSequence
from ...schedules import TrainingSchedule, shifted_training_schedule
from ..base import Branch, ModelFamily
from . import CARD, CONTROLNET_CARD
from .regional_lora import Z_IMAGE_LORA_STREAMS, place_refined_segment, place_regional, place_stock

PATCH = "2-1"  # the transformer's patch embedder and final layer for 2x2 spatial patches, one frame

# A ControlNet run for one transformer call: (the per-sample latents ``(C, 1, h, w)``, the model time ``(B,)``, the
# global prompt's per-sample real tokens ``(T_b, D)``) -> ZImageControlNetModel's hints, ``{layer: (B, L_c, D)}`` over
# its own sequence ``[image | image padding | global prompt, padded]`` (docs/design.md section 23).
Control = Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor]], dict[int, torch.Tensor]]


# -- latents ---------------------------------------------------------------------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Spatial latents ``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4 C)``, tokens row-major, as FLUX packs them (the layout
    the shared loop, the masks and inpainting read). A permutation: nothing is computed."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent grid ``height x width``: ``(B, C, height, width)``."""
    b, _, channels = packed.shape
    c = channels // 4
    return packed.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_grid(pipe, height: int, width: int) -> tuple[int, int]:
    """The latent grid of an image ``height x width`` as ZImagePipeline.prepare_latents makes it."""
    step = pipe.vae_scale_factor * 2
    return 2 * (int(height) // step), 2 * (int(width) // step)


# -- the attention processor -----------------------------------------------------------------------------------------

def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's complex rotary embedding, written as diffusers' processor writes it."""
    with torch.amp.autocast("cuda", enabled=False):
        rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(rotated * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class RegionalZImageAttnProcessor(RegionalProcessor, ZSingleStreamAttnProcessor):
    """diffusers' ``ZSingleStreamAttnProcessor`` whose attention call is :func:`attend` (every form of the regional
    mask). Without a mask, or with the transformer's own key-padding mask, it computes what the stock one does.

    ``attention_mask``: None, a key-padding mask ``(B, L)``, a mask in any regional form, or the dictionary the
    family's regional forward passes ``{"attention_mask": regional, "padding": (B, L) or None}``: the dictionary is
    the block argument that :func:`eligen.speedups.mask_only_in_blocks` strips the regional mask from, leaving the
    padding.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        if isinstance(attention_mask, dict):
            attention_mask = attention_mask.get("attention_mask", attention_mask.get("padding"))
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rope(query, freqs_cis), _rope(key, freqs_cis)
        dtype = query.dtype
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        hidden_states = attend(query, key.to(dtype), value, attention_mask, self._attention_backend,
                               self._parallel_config, dropout_p=0.0, is_causal=False)
        output = attn.to_out[0](hidden_states.flatten(2, 3).to(dtype))
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


# -- the joint sequence of the regional forward ----------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The joint sequence the regional forward builds, per sample: ``[e_1 | ... | e_N | global | image padding |
    image]`` (the shared order; attention is permutation-equivariant and every token carries its own RoPE position,
    so the order is free), each text segment padded to a multiple of 32.

    ``real[b][s]``: the real tokens of segment ``s`` of sample ``b`` (the branch's text mask says which); ``padded``:
    with the model's padding; ``n_img`` image tokens padded by ``image_pad``; ``raw``: the segment lengths of the
    branch's sequence, the regional mask's layout ``[raw segments | image]``.
    """

    real: tuple[tuple[int, ...], ...]
    raw: tuple[int, ...]
    n_img: int

    @property
    def batch(self) -> int:
        return len(self.real)

    @property
    def image_pad(self) -> int:
        return (-self.n_img) % SEQ_MULTI_OF

    def padded(self, b: int) -> tuple[int, ...]:
        return tuple(r + (-r) % SEQ_MULTI_OF for r in self.real[b])

    def text_length(self, b: int) -> int:
        return sum(self.padded(b))

    def image_start(self, b: int) -> int:
        """Where sample ``b``'s image tokens start (after its text and the image padding)."""
        return self.text_length(b) + self.image_pad

    def length(self, b: int) -> int:
        return self.image_start(b) + self.n_img

    @property
    def uniform(self) -> bool:
        """Every sample has the same layout (no batch padding)."""
        return len(set(self.real)) == 1

    def sources(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src (B, L), valid (B, L))``: for each token of the joint sequence, the token of the regional mask's
        layout whose row and column it shares under the rule, and whether it is a token at all (batch padding is
        not). A segment's padding shares its segment's first token's, the image padding the global prompt's first
        token's (an image token no entity covers sees and is seen by the global prompt and every image token, as the
        global prompt is); the image tokens are themselves."""
        total, raw_text = max(self.length(b) for b in range(self.batch)), sum(self.raw)
        starts = [sum(self.raw[:s]) for s in range(len(self.raw))]
        src = torch.zeros(self.batch, total, dtype=torch.long)
        valid = torch.zeros(self.batch, total, dtype=torch.bool)
        for b in range(self.batch):
            parts = []
            for s, (real, padded) in enumerate(zip(self.real[b], self.padded(b), strict=True)):
                parts += [starts[s] + torch.arange(real), torch.full((padded - real,), starts[s])]
            parts += [torch.full((self.image_pad,), starts[-1]), raw_text + torch.arange(self.n_img)]
            row = torch.cat(parts)
            src[b, : row.numel()] = row
            valid[b, : row.numel()] = True
        return src.to(device), valid.to(device)


def _rows(src: torch.Tensor, valid: torch.Tensor, layout: Layout, mask_batch: int):
    """The per-sample tables of :meth:`Layout.sources`, one row for a uniform layout, and how many masks to make
    (a per-sample regional mask, as in training, keeps its batch)."""
    if layout.uniform:
        src, valid = src[:1], valid[:1]
    return src, valid, max(src.shape[0], mask_batch)


def dense_in_layout(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The dense regional mask ``(B', 1, L, L)`` over ``[raw segments | image]`` -> ``(B', 1, L', L')`` over the
    joint sequence (``B`` rows where the samples' layouts differ); batch padding is never a key, and its rows see
    every real key (they are dropped at the end)."""
    src, valid, batch = _rows(*layout.sources(mask.device), layout, mask.shape[0])
    out = []
    for b in range(batch):
        rows, row = mask[min(b, mask.shape[0] - 1), 0], min(b, src.shape[0] - 1)
        gathered = rows[src[row]][:, src[row]] & valid[row][None, :]
        out.append(torch.where(valid[row][:, None], gathered, valid[row][None, :]))
    return torch.stack(out)[:, None]


def segmented_in_layout(mask: SegmentedMask, layout: Layout) -> SegmentedMask:
    """The segmented form over the joint sequence: the padded segments, the image padding inside the
    ``[global | image]`` range (it behaves as the global prompt does), the image tokens last."""
    if not layout.uniform:
        raise ValueError("segmented attention takes one layout for the batch, but these prompts pad to different "
                         "lengths; pass attention='dense' or 'flex'")
    padded = layout.padded(0)
    starts = [sum(padded[:s]) for s in range(len(padded))]
    image_start = layout.image_start(0)
    slices = tuple(slice(a, a + n) for a, n in zip(starts[:-1], padded[:-1], strict=True))
    device = mask.entity_image[0].device if mask.entity_image else None
    keys = tuple(torch.cat([torch.arange(s.start, s.stop, device=device), image_start + covered])
                 for s, covered in zip(slices, mask.entity_image, strict=True))
    for positions in keys:
        torch._dynamo.maybe_mark_dynamic(positions, 0)
    return replace(mask, entity_slices=slices, global_slice=slice(starts[-1], image_start), image_start=image_start,
                   length=image_start + layout.n_img, entity_keys=keys)


def flex_in_layout(mask: Any, layout: Layout, device: torch.device) -> Any:
    """The FlexAttention form over the joint sequence: the regional ``mask_mod`` read through :meth:`Layout.sources`
    (the rule itself is unchanged), its block structure made by ``create_block_mask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    inner, inner_batch = mask.mask_mod, mask.kv_num_blocks.shape[0]
    src, valid, batch = _rows(*layout.sources(device), layout, inner_batch)
    last = src.shape[1] - 1

    def mask_mod(b, h, q, k):
        row = b.clamp(max=src.shape[0] - 1)
        q, k = q.clamp(max=last), k.clamp(max=last)
        seen = inner(b.clamp(max=inner_batch - 1), h, src[row, q], src[row, k])
        return valid[row, k] & (seen | ~valid[row, q])

    return create_block_mask(mask_mod, batch, None, last + 1, last + 1, device=device)


def in_layout(mask: Any, layout: Layout, device: torch.device) -> Any:
    """The branch's regional mask (any form) over the joint sequence of ``layout``."""
    if isinstance(mask, SegmentedMask):
        return segmented_in_layout(mask, layout)
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex_in_layout(mask, layout, device)
    return dense_in_layout(mask, layout)


def hints_in_layout(hints: dict[int, torch.Tensor], layout: Layout) -> dict[int, torch.Tensor]:
    """ControlNet hints over the ControlNet's sequence ``[image | image padding | global prompt, padded]`` ``(B, L_c,
    D)`` -> over the joint sequence ``[e_1 | ... | e_N | global | image padding | image]`` ``(B, L, D)``: the image
    tokens, the image padding and the global prompt's tokens take theirs, the entity segments (which the ControlNet
    never read) and the batch padding nothing."""
    n_img, pad = layout.n_img, layout.image_pad
    joint = {}
    for place, hint in hints.items():
        rows = []
        for b in range(layout.batch):
            padded = layout.padded(b)
            text = hint[b, n_img + pad: n_img + pad + padded[-1]]
            rows.append(torch.cat([hint.new_zeros(sum(padded[:-1]), hint.shape[-1]), text,
                                   hint[b, n_img: n_img + pad], hint[b, :n_img]]))
        joint[place] = pad_sequence(rows, batch_first=True, padding_value=0.0)
    return joint


@dataclass
class ZImageBranch(Branch):
    """A Z-Image CFG branch; ``joint_masks`` keeps its regional mask in each joint-sequence layout it has met (built
    on the first step, reused by the others)."""

    joint_masks: dict = field(default_factory=dict)


# -- the family ------------------------------------------------------------------------------------------------------

def _unwrapped(transformer):
    """The transformer module inside a ``torch.compile`` / accelerate wrapper."""
    for attribute in ("_orig_mod", "module"):
        transformer = getattr(transformer, attribute, transformer)
    return transformer


def _captions(branch: Branch) -> list[torch.Tensor]:
    """A branch's text as the transformer takes it: each sample's real tokens ``(T_b, D)``."""
    if branch.text_mask is None:
        return list(branch.context.unbind(0))
    return [text[valid.bool()] for text, valid in zip(branch.context, branch.text_mask, strict=True)]


def _layout(branch: Branch, n_img: int) -> Layout:
    sequence = branch.sequence
    assert sequence is not None  # set by Branch.__post_init__
    batch = branch.context.shape[0]
    valid = branch.text_mask
    real = []
    for b in range(batch):
        counts = []
        for part in sequence.slices():
            if valid is None:
                counts.append(part.stop - part.start)
                continue
            flags = valid[b, part].bool()
            count = int(flags.sum())
            if not flags[:count].all():
                raise ValueError("a prompt's padding must follow its tokens")
            counts.append(count)
        real.append(tuple(counts))
    return Layout(tuple(real), sequence.lengths, n_img)


class ZImageFamily(ModelFamily):
    card = CARD
    block_lists = ("layers",)  # the main layers, where image and text meet (the refiners see one of them alone)
    block_kwargs = "attn_mask"  # the main layers' mask argument (the regional forward passes a dictionary there)
    processors: ClassVar[dict[type, type]] = {ZSingleStreamAttnProcessor: RegionalZImageAttnProcessor}
    lora_rank = 32
    lora_streams = Z_IMAGE_LORA_STREAMS
    # options the architecture cannot have -> why (eligen.speedups and the pipelines refuse them by name)
    unsupported: ClassVar[dict[str, str]] = {
        "first_block_cache": "diffusers' ZImageTransformer2DModel has no cache support (it is not a CacheMixin: no "
                             "enable_cache / cache_context), so no step cache can be put on it",
    }

    def combine(self, mode: str):
        """``plain``: Z-Image's own rule ``pos + (s - 1)(pos - neg)`` (its ``guidance_scale`` is ``s - 1``; the
        pipeline applies it with the exact ``guidance_scale``, ``cfg_normalization`` and ``cfg_truncation``);
        ``rescaled``: the shared token-wise rescaled combination."""
        rule = super().combine(mode)
        if mode != "plain":
            return rule
        return lambda positive, negative, scale: positive + (scale - 1) * (positive - negative)

    def lora_train_names(self, transformer: torch.nn.Module) -> list[str]:
        """Every linear layer of the main layers (attention q/k/v/out, the SwiGLU feed-forward, the AdaLN
        modulation); the refiners, which never see image and text together, stay frozen."""
        return self.block_linear_names(transformer)

    # -- text ------------------------------------------------------------------------------------------------

    def encode_entities(self, pipe, prompts: Sequence[str], max_sequence_length: int,
                        device: torch.device) -> list[torch.Tensor]:
        """Each entity prompt as ZImagePipeline encodes its prompt: the chat template, the text encoder's
        second-to-last hidden state, the real tokens only (the transformer pads each segment itself)."""
        encoded = pipe._encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)
        return [e[None] for e in encoded]

    def encode_texts(self, pipe, prompts: Sequence[str],
                     max_sequence_length: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        encoded = pipe._encode_prompt(list(prompts), device=pipe._execution_device,
                                      max_sequence_length=max_sequence_length)
        return [(e.cpu(), None) for e in encoded]

    def positions(self, sequence: TokenSequence, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """None: the positions depend on each segment's real length (the model pads it), so the forward makes them:
        ``1 .. P_s`` along the first axis for every segment ``s`` of padded length ``P_s`` (each restarts where the
        global prompt starts), the image after the longest padded segment."""
        return None

    def padding(self, sequence: TokenSequence, valid: torch.Tensor | None, regional: Any) -> tuple[Any, Any]:
        """A batch's padding (prompts of unequal lengths) is masked: the text mask tells the forward each segment's
        real tokens, which it pads with the model's own learned token and masks the rest, as the transformer does
        with a batch of captions."""
        return valid, regional

    # -- latents ---------------------------------------------------------------------------------------------

    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> the VAE's latent mode, shifted and scaled as ZImageImg2ImgPipeline does, packed."""
        z = pipe.vae.encode(pixels).latent_dist.mode()
        return pack_latents((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)

    def decode(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """As ZImagePipeline decodes: to the VAE's dtype, then unscaled and unshifted."""
        latents = unpack_latents(latents, *latent_grid(pipe, height, width)).to(pipe.vae.dtype)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        return pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]

    def geometry(self, pipe, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
        """The latent grid ``(height, width)`` in latent pixels (the transformer takes spatial latents)."""
        return (height, width)

    # -- the transformer -------------------------------------------------------------------------------------

    def forward(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch, geometry,
                guidance: torch.Tensor | None, attention_kwargs: dict | None = None,
                model_time: torch.Tensor | None = None, control: Control | None = None) -> torch.Tensor:
        """Packed latents ``(B, n_img, C)`` at noise level ``timestep`` (B,) -> the velocity ``noise - x0``, packed.

        The transformer's time is ``1 - timestep``; ``model_time`` gives it directly (the pipeline passes
        ``(1000 - t) / 1000`` of the scheduler's ``t``, bit for bit the stock loop's). ``control``: a ControlNet
        whose hints the main layers add (ZImageControlNetPipeline's way).
        """
        if model_time is None:
            model_time = 1 - timestep
        if branch.attention_mask is None and not (branch.sequence and branch.sequence.entities):
            return self.forward_stock(transformer, latents, model_time, [branch], geometry, attention_kwargs,
                                      control)[0]
        return self.forward_regional(transformer, latents, model_time, branch, geometry, attention_kwargs, control)

    def forward_stock(self, transformer, latents: torch.Tensor, model_time: torch.Tensor, branches: Sequence[Branch],
                      geometry, attention_kwargs: dict | None = None,
                      control: Control | None = None) -> list[torch.Tensor]:
        """Branches without entities in one stock transformer call, the latents repeated for each, as
        ZImagePipeline batches its CFG branches (the numerics of a batch depend on its size): a velocity each.
        ``control`` runs on the same inputs, as ZImageControlNetPipeline runs its ControlNet."""
        batch, k = latents.shape[0], len(branches)
        tokens = [branch.lora_tokens for branch in branches if branch.lora_tokens is not None]
        if tokens and k > 1:
            raise ValueError("branches with entity LoRAs run one at a time (each has its own token weights)")
        if tokens:
            place_stock(tokens[0], _layout(branches[0], latents.shape[1]), latents.device)
        x = unpack_latents(latents, *geometry).to(_unwrapped(transformer).dtype)
        if k > 1:
            x = x.repeat(k, 1, 1, 1)
        captions = [c for branch in branches for c in _captions(branch)]
        images, time = list(x.unsqueeze(2).unbind(dim=0)), model_time.repeat(k) if k > 1 else model_time
        hints = None if control is None else control(images, time, captions)
        out = transformer(images, time, captions, controlnet_block_samples=hints,
                          joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
        velocity = -torch.stack([o.float() for o in out], dim=0).squeeze(2)
        return list(pack_latents(velocity).split(batch))

    def forward_regional(self, transformer, latents: torch.Tensor, model_time: torch.Tensor, branch: Branch, geometry,
                         attention_kwargs: dict | None = None, control: Control | None = None) -> torch.Tensor:
        """The transformer's forward written out with the entity segments (see the module doc); ``control``'s hints
        reach the joint sequence through :func:`hints_in_layout`."""
        module = _unwrapped(transformer)
        scale = dict(attention_kwargs or {}).get("scale", 1.0)
        from diffusers.utils import USE_PEFT_BACKEND
        from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers

        if USE_PEFT_BACKEND:
            scale_lora_layers(module, scale)
        try:
            return self._joint_forward(module, latents, model_time, branch, geometry, control)
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(module, scale)

    def _joint_forward(self, module, latents: torch.Tensor, model_time: torch.Tensor, branch: Branch,
                       geometry, control: Control | None = None) -> torch.Tensor:
        device, dtype = latents.device, module.dtype
        checkpointing = torch.is_grad_enabled() and module.gradient_checkpointing

        def run(layer, x, *args, **kwargs):
            call = functools.partial(layer, **kwargs) if kwargs else layer
            return module._gradient_checkpointing_func(call, x, *args) if checkpointing else call(x, *args)

        images = unpack_latents(latents, *geometry).to(dtype)
        adaln = module.t_embedder(model_time * module.t_scale).type_as(images)
        layout = _layout(branch, (geometry[0] // 2) * (geometry[1] // 2))
        weights = branch.lora_tokens  # the entity LoRAs' token weights, placed for each stream as it runs
        if weights is not None:
            place_regional(weights, layout, device)

        # The image alone: patchified, padded to a multiple of 32, refined (the stock code, with the image's
        # positions after the longest padded segment).
        patches, sizes, image_pos, image_pad = [], [], [], []
        for b, image in enumerate(images):
            patch, size, grid = module._patchify_image(image[:, None], 2, 1)
            padded, pos, pad, _, _ = module._pad_with_ids(patch, grid, (max(layout.padded(b)) + 1, 0, 0), device)
            patches.append(padded)
            sizes.append(size)
            image_pos.append(pos)
            image_pad.append(pad)
        lengths = [len(p) for p in patches]
        x = module.all_x_embedder[PATCH](torch.cat(patches, dim=0))
        x, x_freqs, x_mask, _, _ = module._prepare_sequence(list(x.split(lengths, dim=0)), image_pos, image_pad,
                                                            module.x_pad_token, None, device)
        for layer in module.noise_refiner:
            x = run(layer, x, x_mask, x_freqs, adaln)

        # The text: every segment padded on its own (its last token repeated, then the learned pad token), its
        # positions 1 .. P from the global prompt's start; refined apart from the other segments.
        context = branch.context
        raw_starts = [0, *torch.tensor(layout.raw).cumsum(0).tolist()]
        feats: list[list[torch.Tensor]] = [[] for _ in layout.raw]  # [segment][sample]
        pads: list[list[torch.Tensor]] = [[] for _ in layout.raw]
        positions: list[list[torch.Tensor]] = [[] for _ in layout.raw]
        for s in range(len(layout.raw)):
            for b in range(layout.batch):
                tokens = context[b, raw_starts[s]: raw_starts[s] + layout.real[b][s]]
                size = layout.padded(b)[s]
                padded, pos, pad, total, _ = module._pad_with_ids(tokens, (size, 1, 1), (1, 0, 0), device)
                feats[s].append(padded)
                pads[s].append(pad)
                positions[s].append(pos[:total])
        flat = [f for segment in feats for f in segment]
        embedded = list(module.cap_embedder(torch.cat(flat, dim=0)).split([len(f) for f in flat], dim=0))
        refined: list[list[torch.Tensor]] = []
        text_freqs: list[list[torch.Tensor]] = []
        for s in range(len(layout.raw)):
            mine = embedded[s * layout.batch: (s + 1) * layout.batch]
            cap, freqs, mask, seqlens, _ = module._prepare_sequence(mine, positions[s], pads[s], module.cap_pad_token,
                                                                    None, device)
            if weights is not None:
                place_refined_segment(weights, layout, s, device)
            for layer in module.context_refiner:
                cap = run(layer, cap, mask, freqs)
            refined.append([cap[b, :n] for b, n in enumerate(seqlens)])
            text_freqs.append([freqs[b, :n] for b, n in enumerate(seqlens)])

        # The joint sequence [e_1 | ... | e_N | global | image padding | image] and its regional mask.
        n_img, pad_img = layout.n_img, layout.image_pad
        joint, joint_freqs = [], []
        for b in range(layout.batch):
            joint.append(torch.cat([*(segment[b] for segment in refined), x[b, n_img: n_img + pad_img], x[b, :n_img]]))
            joint_freqs.append(torch.cat([*(segment[b] for segment in text_freqs),
                                          x_freqs[b, n_img: n_img + pad_img], x_freqs[b, :n_img]]))
        unified = pad_sequence(joint, batch_first=True, padding_value=0.0)
        unified_freqs = pad_sequence(joint_freqs, batch_first=True, padding_value=0.0)
        padding = None
        if not layout.uniform:
            padding = torch.zeros(unified.shape[:2], dtype=torch.bool, device=device)
            for b in range(layout.batch):
                padding[b, : layout.length(b)] = True
        masks = getattr(branch, "joint_masks", {})
        key = (id(branch.attention_mask), layout)
        if key not in masks:
            masks[key] = in_layout(branch.attention_mask, layout, device)
        mask = {"attention_mask": masks[key], "padding": padding}
        hints = {}
        if control is not None:  # the ControlNet reads the global prompt alone: the last segment's real tokens
            captions = [context[b, raw_starts[-2]: raw_starts[-2] + layout.real[b][-1]] for b in range(layout.batch)]
            hints = hints_in_layout(control(list(images.unsqueeze(2).unbind(dim=0)), model_time, captions), layout)

        for i, layer in enumerate(module.layers):
            unified = run(layer, unified, attn_mask=mask, freqs_cis=unified_freqs, adaln_input=adaln)
            if i in hints:
                unified = unified + hints[i]
        unified = module.all_final_layer[PATCH](unified, c=adaln)
        image_tokens = [unified[b, layout.image_start(b): layout.length(b)] for b in range(layout.batch)]
        out = module.unpatchify(image_tokens, sizes, 2, 1)
        return pack_latents(-torch.stack([o.float() for o in out], dim=0).squeeze(2))

    # -- training --------------------------------------------------------------------------------------------

    def training_schedule(self) -> TrainingSchedule:
        """Shift 3 over 1000 levels, bell-weighted: Z-Image-Turbo's scheduler shift and DiffSynth's flow-matching
        default (no EliGen reference trainer exists for Z-Image)."""
        return shifted_training_schedule()


Z_IMAGE = ZImageFamily()


class ZImageControlNetFamily(ZImageFamily):
    """Z-Image with a ControlNet (diffusers ``ZImageControlNetPipeline``): Z-Image's transformer, text and latents;
    only the card differs. The hints are the pipeline's (docs/design.md section 23)."""

    card = CONTROLNET_CARD


Z_IMAGE_CONTROLNET = ZImageControlNetFamily()
