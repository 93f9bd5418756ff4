"""AdamW on fp32 main weights for the non-matrix params of a bf16 (or FP8) model.

Megatron's Float16OptimizerWithFloat16Params only accepts torch.cuda tensors; this optimizer
does the same job device-agnostically: fp32 main copies of the bf16 params, gradients from
Megatron's fp32 ``main_grad``, AdamW on the main copies (apex FusedAdam on CUDA when apex is
installed, torch AdamW otherwise), then a copy back (one multi-tensor copy). FP8 params
(TransformerEngine) are requantized from the main copies with DP-consistent scales instead
(``mlfop_megatron.megatron.fp8``); Adam state is replicated, so every rank's values agree.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import FP32Optimizer, OptimizerConfig
from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

from mlfop_megatron.megatron import compat, fused_kernels
from mlfop_megatron.megatron.checkpointing import adam_init_state_fn
from mlfop_megatron.megatron.fp8 import get_backend

MAIN_PARAM_PREFIX = "optimizer.state.fp32_param"


class MainParamAdamW(FP32Optimizer):
    """FP32Optimizer semantics over fp32 main copies of low-precision params."""

    def __init__(self, groups: list[dict[str, Any]], config: OptimizerConfig) -> None:
        self.model_params: list[torch.nn.Parameter] = []
        self._fp8 = get_backend()
        main_groups = []
        for group in groups:
            mains = []
            for p in group["params"]:
                if self._fp8.is_quantized(p):
                    value = self._fp8.initial_value(p).float()
                else:
                    value = p.detach().float()
                main = torch.nn.Parameter(value.clone())
                copy_tensor_model_parallel_attributes(main, p)
                if hasattr(p, "shared"):
                    main.shared = p.shared  # type: ignore[attr-defined]  # Megatron's attribute
                self.model_params.append(p)
                mains.append(main)
            main_groups.append(dict(group, params=mains))
        adam = fused_kernels.make_adamw(
            main_groups, config.lr, (config.adam_beta1, config.adam_beta2), config.adam_eps
        )
        super().__init__(adam, config, adam_init_state_fn)
        self.main_params = [m for g in main_groups for m in g["params"]]
        self._quantized = [self._fp8.is_quantized(p) for p in self.model_params]

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Point the main copies' ``.grad`` at the params' ``main_grad`` (fp32)."""
        for p, main in zip(self.model_params, self.main_params):
            grad = compat.main_grad(p)
            main.grad = grad.float() if grad.dtype != torch.float32 else grad
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """AdamW on the main copies, then copy (or requantize) them into the model params."""
        ok = super().step_with_ready_grads()
        pairs = list(zip(self.model_params, self.main_params, self._quantized))
        fused_kernels.copy_(
            [m.data for _, m, q in pairs if not q], [p.data for p, _, q in pairs if not q]
        )
        if any(self._quantized):
            from megatron.core import parallel_state

            self._fp8.requantize(
                [p for p, _, q in pairs if q],
                [m.data for _, m, q in pairs if q],
                parallel_state.get_data_parallel_group(with_context_parallel=True),
            )
        return ok

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the main copies' gradients (the model's ``main_grad`` is the DDP's)."""
        for main in self.main_params:
            main.grad = None

    @torch.no_grad()
    def reload_model_params(self, state_dict: Any = None) -> None:
        """Refill the main copies from the (loaded) model params."""
        for p, main, q in zip(self.model_params, self.main_params, self._quantized):
            main.data.copy_(self._fp8.current_value(p) if q else p.data)

    def state_dict(self) -> dict[str, Any]:
        """The Adam state plus the fp32 main copies (``fp32_params``)."""
        out = self.optimizer.state_dict()
        out["fp32_params"] = {i: m.detach().clone() for i, m in enumerate(self.main_params)}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` (the main copies too, when saved)."""
        mains = state_dict.pop("fp32_params", None)
        super().load_state_dict(state_dict)
        if mains is not None:
            with torch.no_grad():
                for i, value in mains.items():
                    self.main_params[int(i)].copy_(value)

    def sharded_state_dict(
        self, model_sharded_state_dict: Any, is_loading: bool = False, metadata: Any = None
    ) -> dict[str, Any]:
        """The Adam state and main copies as sharded tensors of the model params' state."""
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.model_params)
        step = self._extract_common_per_param_step(state)
        optim_state_to_sharding_state(state, id_map, exclude_keys="step")
        if step:
            state["state"]["common_step"] = step
        state["fp32_params"] = {
            i: make_sharded_optimizer_tensor(id_map[i], main, MAIN_PARAM_PREFIX)
            for i, main in enumerate(self.main_params)
            if i in id_map
        }
        return state
