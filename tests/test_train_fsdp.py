"""The shipped accelerate configurations for training at scale (docs/design.md section 6.1).

accelerate 1.16 runs FSDP only on CUDA-like devices (on the CPU its state stays MULTI_CPU whatever the config says),
so here the FSDP configuration is tested as far as it can be: accelerate's own loader reads it, and the wrap policy
it builds shards exactly the family's transformer blocks. The 2-process DDP run and its resume are in test_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_the_fsdp_config_is_fsdp2_wrapping_by_transformer_block():
    config = load_config_from_file(str(CONFIGS / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # no class list: accelerate takes the model's _no_split_modules, so one file serves every family
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert config.mixed_precision == "bf16" and not config.use_cpu


def test_the_deepspeed_config_still_parses():
    config = load_config_from_file(str(CONFIGS / "accelerate_deepspeed_zero2.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED


def _transformer(family: str) -> torch.nn.Module:
    if family == "flux":
        from eligen.families.flux.testing import build_components
    else:
        from eligen.families.qwen_image.testing import build_components
    return build_components()["transformer"]


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_the_wrap_policy_shards_each_transformer_block(family):
    from eligen.families.flux.model import FLUX
    from eligen.families.qwen_image.model import QWEN_IMAGE

    block_lists = {"flux": FLUX, "qwen_image": QWEN_IMAGE}[family].block_lists
    fsdp = load_config_from_file(str(CONFIGS / "accelerate_fsdp.yaml")).fsdp_config
    plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp["fsdp_version"],
                                            auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"])
    transformer = _transformer(family)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, transformer)
    assert policy is not None
    wrapped = [name for name, module in transformer.named_modules() if policy(module)]
    blocks = [f"{lst}.{i}" for lst in block_lists for i in range(len(getattr(transformer, lst)))]
    assert wrapped == blocks and len(blocks) >= 2
