"""The named choices of eligen's options, in one torch-free place (configs validate against them without loading
torch; the modules that act on them import them from here)."""

from __future__ import annotations

# How the regional mask reaches attention (all exact; "auto" picks per device) and the entity segment lengths:
# "full" pads every entity prompt to max_sequence_length, "trim" keeps its real tokens plus a few pads.
ATTENTION_MODES = ("auto", "dense", "flex", "segmented")
ENTITY_TOKEN_MODES = ("full", "trim")
# True CFG: "plain" is neg + s (pos - neg); "rescaled" rescales that to the positive prediction's norm.
CFG_MODES = ("plain", "rescaled")
# Inpainting fusion order: "exact" applies CFG first (the background ends at the input), "paper" fuses first.
FUSIONS = ("exact", "paper")
# Training noise levels: the reference's schedule with its weights, or SD3's logit-normal.
TIMESTEP_SAMPLING = ("reference", "logit_normal")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# The largest magnitude any scale takes (true CFG, guidance, a LoRA's, the IP-Adapter's, an entity's image_scale):
# a finite but absurd one (1e30) passes the NaN/inf checks and saturates the image to black, so it is refused.
SCALE_LIMIT = 100
