"""EliGen LoRA files, whatever the model family: the in-memory form, format detection, reading, writing, checking
against a transformer, and loading into peft (docs/design.md section 4).

The in-memory form is :class:`LoraWeights`: one :class:`LoraLayer` ``(down A [r, in], up B [out, r], alpha)`` per
diffusers ``nn.Linear`` of the transformer, keyed by its module name (``transformer_blocks.3.attn.to_q``). The
effective update of a layer is ``W += (alpha / r) * B @ A``.

Three key formats are in the wild: ``diffusers`` (``transformer.<module>.lora_A.weight``, peft names, optional
``.alpha``) is the same for every family and lives here; ``diffsynth`` (the reference's) and ``kohya`` have a form
per family, which the family's :class:`KeyFormats` (named on its card) reads and writes. Which family a file is for
comes from its key style, else from the module names only one family has (each family's ``markers``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from .config import option
from .families import FAMILIES, card, cards, family_of_transformer
from .families.card import load
from .files import atomic_path

if TYPE_CHECKING:
    import torch

FORMATS = ("diffsynth", "kohya", "diffusers")
DIFFUSERS_KEY = re.compile(r"^(?:transformer\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|"
                           r"lora_B\.default\.weight|alpha)$")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model."""


def few(keys, n: int = 5) -> str:
    """A few of ``keys``, sorted, and how many more there are."""
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@dataclass
class LoraLayer:
    """One adapted linear layer: ``down`` A ``(r, in)``, ``up`` B ``(out, r)``, ``alpha`` (None means r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self) -> torch.Tensor:
        """The weight update ``(alpha / r) * B @ A``: ``(out, in)`` in float32."""
        return self.scale * (self.up.float() @ self.down.float())

    def folded(self) -> LoraLayer:
        """The same update with ``alpha = r`` (the scale folded into ``up``)."""
        if self.alpha is None or self.alpha == self.rank:
            return LoraLayer(self.down, self.up, None)
        return LoraLayer(self.down, (self.up.float() * self.scale).to(self.up.dtype), None)


LoraWeights = dict[str, LoraLayer]


class KeyFormats:
    """A family's own LoRA key styles (its ``diffsynth`` and ``kohya`` forms); the family's card names one.

    ``markers``: module-name parts that only this family's transformer has (they tell a diffusers-named file's
    family); a marker with dots (``ff.net``) is a run of consecutive parts, in which ``*`` stands for any one part
    (``single_transformer_blocks.*.proj_out``). ``hub_files``: the released LoRA repos
    and the file in each. ``block_names``: the transformer's block lists as ``eligen lora info`` calls them
    (``double`` / ``single``). ``forms``: the family's own formats it writes (a trained LoRA is saved in these and
    in diffusers form).
    """

    markers: ClassVar[frozenset[str]] = frozenset()
    forms: ClassVar[tuple[str, ...]] = ("diffsynth", "kohya")
    hub_files: ClassVar[dict[str, str]] = {}
    block_names: ClassVar[dict[str, str]] = {"transformer_blocks": "double", "single_transformer_blocks": "single"}

    def style(self, key: str) -> str | None:
        """The family's own format (``diffsynth`` / ``kohya``) a key is written in; None for any other key."""
        return None

    def peft_style(self, keys: list[str]) -> str:
        """The format name of a file of peft/diffusers keys for this family (``diffusers`` unless the family's
        reference writes peft keys of its own)."""
        return "diffusers"

    def read(self, style: str, state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
        """Keys the family's :meth:`style` claims -> diffusers-named layers."""
        raise LoraFormatError(f"no {style} form for this family")

    def write(self, style: str, weights: LoraWeights) -> dict[str, torch.Tensor]:
        """``weights`` in the family's ``diffsynth`` or ``kohya`` form."""
        raise LoraFormatError(f"no {style} form for this family; write it as diffusers")

    def reference_layers(self, weights: LoraWeights) -> int:
        """Layers as the family's DiffSynth file names them (nothing fused: one per layer)."""
        return len(weights)


@cache
def key_formats() -> dict[str, KeyFormats]:
    """Every registered family's :class:`KeyFormats`."""
    return {name: load(c.lora_keys) for name, c in cards().items()}


def hub_default_files() -> dict[str, str]:
    """The released EliGen LoRA repos of every family and the file in each."""
    return {repo: file for formats in key_formats().values() for repo, file in formats.hub_files.items()}


# ----------------------------------------------------------------------------------------------------------
# Which family
# ----------------------------------------------------------------------------------------------------------


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    return family


@cache
def _marker(marker: str) -> re.Pattern:
    """A dotted marker as a pattern over a dotted module name (``*``: any one part)."""
    parts = (r"[^.]+" if p == "*" else re.escape(p) for p in marker.split("."))
    return re.compile(r"(?:^|\.)" + r"\.".join(parts) + r"(?:\.|$)")


def _named_family(modules) -> str | None:
    """The family that module names such as ``transformer_blocks.0.img_mod.1`` belong to; None if they are
    common to several (``attn.to_q``, ``proj_out``, ...). A name that carries markers of several families tells
    nothing either (``ff`` and ``gate`` in ``ff.gate``). Raises for names of several families at once."""
    found: dict[str, list[str]] = {}
    for module in modules:
        parts = set(module.split("."))
        hits = [family for family, formats in key_formats().items()
                if any(m in parts if "." not in m else _marker(m).search(module) for m in formats.markers)]
        if len(hits) == 1:
            found.setdefault(hits[0], []).append(module)
    if len(found) > 1:
        raise LoraFormatError("the LoRA mixes layers of several model families: " + "; ".join(
            f"{card(f).title} ({few(names, 2)})" for f, names in found.items()))
    return next(iter(found), None)


def lora_family(weights: LoraWeights, family: str | None = None) -> str:
    """The family of ``weights``, from their module names.

    ``family`` decides only when every name is common to several families (``attn.to_q`` alone); the names win
    otherwise. Raises :class:`LoraFormatError` when they cannot tell and no ``family`` is given, or when the
    LoRA mixes layers of several families.
    """
    found = _named_family(weights)
    if found is not None:
        return found
    if family is not None:
        return _check_family(family)
    raise LoraFormatError(f"cannot tell which model family this LoRA is for: its layer names are common to several "
                          f"({few(weights, 3)}); give the family (one of {', '.join(FAMILIES)})")


def transformer_family(transformer: torch.nn.Module) -> str:
    """The family of a transformer (its class or a subclass); raises ``ValueError`` for any other module."""
    family = family_of_transformer(transformer)
    if family is None:
        known = ", ".join(t for c in cards().values() for t in c.transformers)
        raise ValueError(f"{type(transformer).__name__} is not a transformer EliGen knows (expected one of: {known})")
    return family


# ----------------------------------------------------------------------------------------------------------
# Format detection and readers (all produce split, diffusers-named layers)
# ----------------------------------------------------------------------------------------------------------


def require_pairs(grouped: Mapping[tuple, dict[str, torch.Tensor]], what: str) -> None:
    """Every layer of ``grouped`` has both its lora_A and lora_B."""
    for layer, parts in grouped.items():
        missing = {"down", "up"} - set(parts)
        if missing:
            raise LoraFormatError(f"{what} layer {'.'.join(map(str, layer))} has no lora_{'/'.join(sorted(missing))}")


WEIGHT_LIMIT = 1e4  # no trained LoRA weight comes near it; finite but absurd ones (1e30) saturate the image


def checked_layer(where: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(down, up, alpha)`` of one layer, refused unless A is ``[r, in]`` and B ``[out, r]`` with ``r >= 1``, the
    weights are finite and below :data:`WEIGHT_LIMIT` and alpha is one finite number."""
    down, up = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise LoraFormatError(f"mis-shaped LoRA pair at {where}: lora_A {tuple(down.shape)}, lora_B "
                              f"{tuple(up.shape)} (need A [r, in], B [out, r])")
    if down.shape[0] == 0:
        raise LoraFormatError(f"the LoRA layer {where} has rank 0 (lora_A {tuple(down.shape)}): it adapts nothing")
    for name, tensor in (("lora_A", down), ("lora_B", up)):
        if tensor.device.type == "meta" or not tensor.numel():
            continue
        if not tensor.float().isfinite().all():
            raise LoraFormatError(f"the LoRA layer {where} has non-finite values (NaN or inf) in {name}")
        peak = float(tensor.float().abs().max())
        if peak > WEIGHT_LIMIT:
            raise LoraFormatError(f"the LoRA layer {where} has weights as large as {peak:.3g} in {name} (a trained "
                                  f"LoRA's stay far below {WEIGHT_LIMIT:g}); it would only make a black image")
    alpha = None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(f"the LoRA layer {where} has an alpha of shape {tuple(parts['alpha'].shape)}; "
                                  "alpha is one number per layer")
        alpha = float(parts["alpha"].float().item())
        if not 0 < abs(alpha) <= WEIGHT_LIMIT:
            raise LoraFormatError(f"the LoRA layer {where} has alpha {alpha:g}: it must be a non-zero number of at "
                                  f"most {WEIGHT_LIMIT:g} in magnitude")
    return down, up, alpha


def checked_layers(grouped: dict[str, dict[str, torch.Tensor]], what: str) -> LoraWeights:
    """Diffusers-named ``{module: {down, up[, alpha]}}`` -> checked layers, sorted by name."""
    require_pairs({(m,): p for m, p in grouped.items()}, what)
    return {module: LoraLayer(*checked_layer(module, parts)) for module, parts in sorted(grouped.items())}


def read_diffusers(state_dict: Mapping[str, torch.Tensor]) -> LoraWeights:
    """Peft/diffusers keys (``transformer.`` prefix and ``.default`` optional) -> layers."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = DIFFUSERS_KEY.match(key)
        if match is None:
            raise LoraFormatError(f"not a diffusers/peft LoRA key: {key}")
        module, part = match.groups()
        slot = "alpha" if part == "alpha" else "down" if part.startswith("lora_A") else "up"
        grouped.setdefault(module, {})[slot] = tensor
    return checked_layers(grouped, "diffusers")


def _styles(keys: list[str], family: str | None = None) -> dict[str, tuple[str, str]]:
    """``key -> (family, style)`` for every key some family's own style claims: ``family``'s style first (two
    families' forms can share key names), then in registry order."""
    out = {}
    order = sorted(key_formats().items(), key=lambda item: item[0] != family)
    for key in keys:
        for owner, formats in order:
            style = formats.style(key)
            if style is not None:
                out[key] = (owner, style)
                break
    return out


def _detect(keys: list[str], family: str | None) -> tuple[str, str | None]:
    """``(format, family the key style names or None)``; raises :class:`LoraFormatError` for anything else."""
    if not keys:
        raise LoraFormatError("the LoRA file holds no tensors")
    claimed = _styles(keys, family)
    kinds = set(claimed.values())
    owner: str | None
    if len(claimed) == len(keys) and len(kinds) == 1:
        owner, style = kinds.pop()
        return style, owner
    if kinds:
        counts = {kind: sum(1 for v in claimed.values() if v == kind) for kind in kinds}
        major = max(counts, key=lambda k: counts[k])
        others = [k for k in keys if claimed.get(k) != major]
        raise LoraFormatError(f"the keys mix formats: most are {major[1]} keys of {card(major[0]).title}, but not "
                              f"these: {few(others)}")
    unknown = [k for k in keys if not DIFFUSERS_KEY.match(k)]
    if unknown:
        raise LoraFormatError("not an EliGen LoRA in a known key format (DiffSynth, kohya or diffusers/peft of "
                              f"{', '.join(c.title for c in cards().values())}); unrecognised keys: {few(unknown)}")
    try:
        named = _named_family({DIFFUSERS_KEY.match(k).group(1) for k in keys})  # type: ignore[union-attr]
    except LoraFormatError:  # several families' layers: read as diffusers, refused when checked against a model
        return "diffusers", None
    owner = named or family
    return (key_formats()[owner].peft_style(keys) if owner else "diffusers"), None


def detect_format(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> str:
    """``diffsynth``, ``kohya`` or ``diffusers``; raises :class:`LoraFormatError` for anything else.

    ``family`` names the format of peft keys whose layer names are common to several families (a family whose
    reference writes peft keys calls them ``diffsynth``)."""
    return _detect(list(state_dict), family)[0]


def read_lora_family(state_dict: Mapping[str, torch.Tensor],
                     family: str | None = None) -> tuple[LoraWeights, str, str | None]:
    """:func:`read_lora`, plus the family the file is for: from its key style, else from its layer names, else
    ``family``; None when nothing tells. Raises when the file is for another family than ``family``."""
    if family is not None:
        _check_family(family)
    fmt, owner = _detect(list(state_dict), family)
    weights = key_formats()[owner].read(fmt, state_dict) if owner else read_diffusers(state_dict)
    try:
        found = owner or _named_family(weights)
    except LoraFormatError:  # layers of several families: still readable, refused when checked against a model
        if family is not None:
            raise
        found = None
    if family is not None and found not in (None, family):
        raise LoraFormatError(f"this LoRA is for {card(found).title}, not {card(family).title}")
    return weights, fmt, found or family


def read_lora(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[LoraWeights, str]:
    """Detect the format and convert to diffusers-named split layers.

    ``family``, when given, is checked against the file and decides the format name of peft keys whose layer
    names are common to several families.
    """
    weights, fmt, _ = read_lora_family(state_dict, family)
    return weights, fmt


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


def kohya_layer(stem: str, layer: LoraLayer) -> dict[str, torch.Tensor]:
    """One layer's kohya tensors: ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` (the rank if none)."""
    import torch

    return {f"{stem}.lora_down.weight": layer.down.contiguous(), f"{stem}.lora_up.weight": layer.up.contiguous(),
            f"{stem}.alpha": torch.tensor(float(layer.alpha if layer.alpha is not None else layer.rank))}


def write_diffusers(weights: LoraWeights, with_alpha: bool = True) -> dict[str, torch.Tensor]:
    """``transformer.<module>.lora_A.weight`` keys; alpha kept as ``.alpha`` (or folded into B)."""
    import torch

    out = {}
    for module, layer in sorted(weights.items()):
        if not with_alpha:
            layer = layer.folded()
        out[f"transformer.{module}.lora_A.weight"] = layer.down.contiguous()
        out[f"transformer.{module}.lora_B.weight"] = layer.up.contiguous()
        if with_alpha and layer.alpha is not None:
            out[f"transformer.{module}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def write_lora(weights: LoraWeights, fmt: str, family: str | None = None) -> dict[str, torch.Tensor]:
    """``weights`` in the key format ``fmt`` of their family (``family`` decides when the layer names are common
    to several; the first registered family when neither tells)."""
    if fmt == "diffusers":
        return write_diffusers(weights)
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    return key_formats()[lora_family(weights, family or FAMILIES[0])].write(fmt, weights)


# ----------------------------------------------------------------------------------------------------------
# Files, hub ids, model checks
# ----------------------------------------------------------------------------------------------------------


def resolve_lora_path(path_or_hub_id: str | Path, filename: str | None = None) -> Path:
    """A local file, a directory holding one ``.safetensors``, a file of the shipped model
    (``"eligen-tiny/<file>"``) or a hub id (downloaded via huggingface_hub)."""
    from .models import HUB_ID, resolve_file

    path = Path(resolve_file(path_or_hub_id))
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob(filename or "*.safetensors"))
        if len(files) != 1:
            raise LoraFormatError(f"{path} holds {len(files)} .safetensors files; name the LoRA file itself")
        return files[0]
    text = str(path_or_hub_id)
    if HUB_ID.fullmatch(text) and not path.suffix:
        from huggingface_hub import hf_hub_download

        name = filename or hub_default_files().get(text)
        if name is None:
            raise LoraFormatError(f"hub repo {text}: give the file name inside it (filename=...)")
        return Path(hf_hub_download(text, name))
    raise FileNotFoundError(f"LoRA not found: {path_or_hub_id} is neither a file, a directory nor a hub id")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise LoraFormatError(f"{path} is not a readable .safetensors file ({exc})") from exc


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path, fmt: str) -> None:
    from safetensors.torch import save_file

    # clone: split layers share one lora_A tensor, and safetensors refuses tensors that share memory
    save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(path),
              metadata={"format": "pt", "eligen_format": fmt})


def _check_family_fits(weights: LoraWeights, transformer: torch.nn.Module) -> None:
    """A LoRA whose layer names belong to another family than the transformer's class (unknown classes pass: the
    layer checks still apply)."""
    expected = family_of_transformer(transformer)
    if expected is None:
        return
    found = lora_family(weights, expected)
    if found != expected:
        raise LoraFormatError(f"this LoRA is for {card(found).title} but the pipeline's transformer is "
                              f"{card(expected).title} ({type(transformer).__name__}); load it into a "
                              f"{card(found).title} pipeline")


def check_fits(weights: LoraWeights, transformer: torch.nn.Module) -> None:
    """Refuse a LoRA that does not fit ``transformer`` as a whole (nothing is applied partially): a LoRA of the
    other model family, layers the transformer lacks, layers of other shapes."""
    import torch

    from .speedups import Fp8Linear

    _check_family_fits(weights, transformer)
    modules = dict(transformer.named_modules())
    missing, misshaped = [], []
    for name, layer in weights.items():
        module = modules.get(name)
        module = getattr(module, "base_layer", module)  # a layer that already carries another adapter
        if isinstance(module, Fp8Linear):
            raise LoraFormatError(f"the LoRA layer {name} is an fp8 layer of speedups.quantize_fp8: peft wraps only "
                                  "nn.Linear, so load LoRAs first and quantise after")
        if not isinstance(module, torch.nn.Linear):
            missing.append(name)
        elif layer.down.shape[1] != module.in_features or layer.up.shape[0] != module.out_features:
            misshaped.append(f"{name} (LoRA {layer.up.shape[0]}x{layer.down.shape[1]}, layer "
                             f"{module.out_features}x{module.in_features})")
    if missing:
        raise LoraFormatError(f"{len(missing)} LoRA layers do not exist in this transformer (a LoRA for another "
                              f"architecture or depth?): {few(missing)}")
    if misshaped:
        raise LoraFormatError(f"{len(misshaped)} LoRA layers do not match the layer shapes (a LoRA for a model of "
                              f"another width?): {few(misshaped, 3)}")


def load_lora_adapter(pipe, path_or_hub_id: str | Path, adapter_name: str, scale: float, filename: str | None,
                      family: str, activate: bool = True) -> str:
    """Read a LoRA file of any format, check it against ``pipe.transformer`` as a whole (nothing is applied
    partially), and load it as the peft adapter ``adapter_name`` in the transformer's dtype, active at ``scale``
    beside the adapters already active (``activate=False``: loaded but switched on nowhere, as an entity's LoRA is
    between calls). Returns the detected format."""
    import warnings

    weights, fmt = read_lora(load_state_dict(resolve_lora_path(path_or_hub_id, filename)), family)
    transformer = pipe.transformer
    check_fits(weights, transformer)
    previous = pipe.get_active_adapters() if getattr(transformer, "peft_config", None) else []
    state = {k: v.to(transformer.dtype) for k, v in write_diffusers(weights, with_alpha=False).items()}
    with warnings.catch_warnings():  # stacking adapters is the point here, not a mistake peft should flag
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name,
                                      metadata=peft_config(weights), _pipeline=pipe, low_cpu_mem_usage=True)
    if activate:
        transformer.set_adapter([*previous, adapter_name])  # keeps the others active, at their weights
    else:
        deactivate_adapter(transformer, adapter_name)
    if scale != 1.0:
        set_adapter_scale(transformer, adapter_name, scale)
    return fmt


def deactivate_adapter(transformer: torch.nn.Module, adapter_name: str) -> None:
    """Switch one peft adapter off in every layer of ``transformer``, leaving the others as they are."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module.active_adapters:
            module.set_adapter([a for a in module.active_adapters if a != adapter_name], inference_mode=True)


def set_adapter_scale(transformer: torch.nn.Module, adapter_name: str, scale: float) -> None:
    """Re-weight one peft adapter of ``transformer`` without touching the others."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "scaling", {}):
            cast(Any, module).set_scale(adapter_name, scale)  # LoRA layers' method; BaseTunerLayer declares none


@dataclass
class LoraInfo:
    format: str
    family: str  # a registered family, or unknown (layer names common to several)
    layers: int
    reference_layers: int
    ranks: list[int]
    alphas: list[float]
    double_blocks: list[int]
    single_blocks: list[int]
    dtype: str


def peft_config(weights: LoraWeights, prefix: str = "transformer") -> dict:
    """``LoraConfig`` kwargs (keyed ``prefix.<field>`` as diffusers' loader expects) for ``weights`` with alpha
    folded: alpha = rank in every layer, exact module names, per-layer ranks anchored with ``^`` like diffusers.
    """
    ranks = {name: layer.rank for name, layer in weights.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {f"^{name}": r for name, r in ranks.items() if r != common}
    config = {
        "r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        # a regex string is matched against whole module names; a list would match by suffix, so "proj_out"
        # would also wrap every single block's proj_out
        "target_modules": "|".join(re.escape(name) for name in sorted(weights)),
        "lora_dropout": 0.0, "bias": "none", "init_lora_weights": False,
    }
    return {f"{prefix}.{k}": v for k, v in config.items()}


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"


def lora_info(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> LoraInfo:
    """What ``eligen lora info`` prints: the family's block lists as double and single blocks (a family of
    dual-stream blocks only has no single blocks)."""
    weights, fmt, found = read_lora_family(state_dict, family)
    formats = key_formats().get(found or "", KeyFormats())
    blocks: dict[str, set[int]] = {"double": set(), "single": set()}
    for module in weights:
        head, _, rest = module.partition(".")
        if head in formats.block_names:
            blocks[formats.block_names[head]].add(int(rest.split(".")[0]))
    first = next(iter(state_dict.values()))
    return LoraInfo(
        format=fmt, family=found or "unknown", layers=len(weights), reference_layers=formats.reference_layers(weights),
        ranks=sorted({layer.rank for layer in weights.values()}),
        alphas=sorted({layer.alpha if layer.alpha is not None else float(layer.rank) for layer in weights.values()}),
        double_blocks=sorted(blocks["double"]), single_blocks=sorted(blocks["single"]),
        dtype=str(first.dtype).removeprefix("torch."),
    )


def format_info(info: LoraInfo) -> str:
    return "\n".join([
        f"format: {info.format}",
        f"family: {info.family}",
        f"rank: {', '.join(map(str, info.ranks))}",
        f"alpha: {', '.join(f'{a:g}' for a in info.alphas)}",
        f"adapted layers: {info.layers} diffusers linear layers ({info.reference_layers} reference layers)",
        f"double blocks: {_ranges(info.double_blocks)}",
        f"single blocks: {_ranges(info.single_blocks)}",
        f"dtype: {info.dtype}",
    ])


# ----------------------------------------------------------------------------------------------------------
# File-level commands (`eligen lora info / convert`)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoraInfoConfig:
    file: Path = option(None, "LoRA .safetensors file (DiffSynth, kohya or diffusers keys)", positional=True,
                        required=True)


@dataclass
class LoraConvertConfig:
    input: Path = option(None, "LoRA .safetensors file to read (any of the three formats)", positional=True,
                         required=True)
    output: Path = option(None, "where to write the converted .safetensors file", positional=True, required=True)
    to: str = option(None, "key format to write", choices=FORMATS, required=True)

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ValueError(f"--to must be one of {FORMATS}, got {self.to!r}")


def convert_lora_file(config: LoraConvertConfig) -> tuple[str, int]:
    """Read ``config.input`` in whatever format it has, write ``config.output`` in ``config.to``.

    Returns the source format and the number of tensors written. The file is written atomically.
    """
    weights, source, family = read_lora_family(load_state_dict(config.input))
    state = write_lora(weights, config.to, family=family)
    with atomic_path(config.output) as tmp:
        save_state_dict(state, tmp, config.to)
    return source, len(state)
