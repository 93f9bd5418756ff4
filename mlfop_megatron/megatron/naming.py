"""Layout-independent parameter names (global layer index), for checkpoints and comparisons."""

from __future__ import annotations

import re

import torch


def canonical_param_names(model: torch.nn.Module) -> dict[torch.nn.Parameter, str]:
    """Layout-independent parameter names: no 'module.' prefix, global decoder layer index.

    The same weight gets the same name under any TP/PP/DP layout (PP stages number their
    layers locally; megatron's ``layer_number`` is global and 1-based). With tied embeddings
    and PP > 1 the last stage's output_layer.weight copy is named like the word embedding.
    """
    layers = {}
    expert_offset = 0  # expert parallelism: local expert i is global expert offset + i
    for name, mod in model.named_modules():
        m = re.search(r"decoder\.layers\.(\d+)$", name)
        if m and hasattr(mod, "layer_number"):
            layers[m.group(1)] = str(mod.layer_number - 1)
        if hasattr(mod, "local_experts") and expert_offset == 0:
            from megatron.core import parallel_state

            ep_rank = parallel_state.get_expert_model_parallel_rank()
            expert_offset = ep_rank * len(mod.local_experts)
    names = {}
    for name, param in model.named_parameters():
        name = name.removeprefix("module.")
        if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
            name = "embedding.word_embeddings.weight"  # tied copy on the last PP stage
        name = re.sub(
            r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{layers[m.group(1)]}.", name
        )
        if expert_offset:
            name = re.sub(
                r"local_experts\.(\d+)\.",
                lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.",
                name,
            )
        names[param] = name
    return names
