"""Regional attention, model-free: the rule (:mod:`.rule`), its dense / flex / segmented forms, and the attention
processors that apply them (:mod:`.processors`, which imports diffusers)."""

from .dense import regional_attention_mask
from .flex import FlexSlot, regional_block_mask
from .rule import allowed, regional_tables, segment_ids
from .segmented import SegmentedMask, segmented_mask

__all__ = ["FlexSlot", "SegmentedMask", "allowed", "regional_attention_mask", "regional_block_mask",
           "regional_tables", "segment_ids", "segmented_mask"]
