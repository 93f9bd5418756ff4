"""The tiny GPT as a megatron-core 0.19 ``HybridModel`` (pattern ``*-`` per GPT block).

megatron-core 0.19 deprecates ``GPTModel`` in favour of ``HybridModel``, where one GPT block
becomes two layers: ``*`` (self-attention) then ``-`` (dense MLP). This builds the tiny GPT of
:mod:`tests.support.tiny_gpt` that way, with Megatron's local (non-TE) modules, and
names its weights after their GPT equivalents so both models can hold identical values.

CPU stand-in: 0.19's ``HybridStack`` builds its final norm with ``TENorm`` unconditionally
(TransformerEngine needs CUDA to install); while the model is built, that name points at
Megatron's ``WrappedTorchNorm``, the same LayerNorm the local GPT spec uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from tests.support.tiny_gpt import TinyGPTConfig, transformer_config, wrap_in_ddp


def hybrid_available() -> bool:
    """Whether this megatron-core has ``megatron.core.models.hybrid`` (0.19+)."""
    try:
        import megatron.core.models.hybrid.hybrid_model  # noqa: F401
    except ImportError:
        return False
    return True


def gpt_pattern(num_gpt_layers: int) -> str:
    """HybridModel layer pattern equivalent to ``num_gpt_layers`` dense GPT blocks."""
    return "*-" * num_gpt_layers


def gpt_equivalent_name(name: str) -> str:
    """Canonical HybridModel param name -> the tiny GPT's name for the same weight."""
    if name.startswith("decoder.final_norm."):
        return name.replace("decoder.final_norm.", "decoder.final_layernorm.")
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) // 2}.{m.group(2)}"


def local_hybrid_stack_spec() -> Any:
    """HybridStack spec with Megatron's local attention / MLP layers (no TransformerEngine)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
        ),
    )
    mlp = partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=WrappedTorchNorm,
                    self_attention=attention,
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=WrappedTorchNorm, mlp=mlp, mlp_bda=get_bias_dropout_add
                ),
            ),
        ),
    )


@contextmanager
def _torch_final_norm() -> Iterator[None]:
    """Point hybrid_block's hard-coded TENorm at WrappedTorchNorm (see module docstring)."""
    import megatron.core.models.hybrid.hybrid_block as hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    saved = hybrid_block.TENorm
    hybrid_block.TENorm = WrappedTorchNorm
    try:
        yield
    finally:
        hybrid_block.TENorm = saved


def build_tiny_hybrid(
    cfg: TinyGPTConfig | None = None,
    ddp_class: type[DistributedDataParallel] = DistributedDataParallel,
    ddp_config: DistributedDataParallelConfig | None = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """The tiny GPT built as a HybridModel (``*-`` per block), wrapped like build_tiny_gpt."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    cfg = cfg or TinyGPTConfig()
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("build_tiny_hybrid builds PP=1 models only")
    config = transformer_config(cfg)
    with _torch_final_norm():
        model = HybridModel(
            config=config,
            hybrid_stack_spec=local_hybrid_stack_spec(),
            vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.seq_length,
            hybrid_layer_pattern=gpt_pattern(cfg.num_layers),
            share_embeddings_and_output_weights=cfg.tie_embeddings,
            position_embedding_type="learned_absolute",
        )
    return wrap_in_ddp(model, config, cfg, ddp_class, ddp_config, **ddp_kwargs)
