"""``MLFOPSOAP``: ML-FOP-SOAP as a torch.optim.Optimizer for plain PyTorch training loops.

Gradient accumulation with folding (``enabled=True``; without it, the default, the step takes
plain SOAP on the mean of the K micro-batch gradients)::

    opt = MLFOPSOAP(model.parameters(), lr=3e-3, accumulation_steps=4, enabled=True)
    for batch in loader:
        for micro in split(batch, 4):
            loss_fn(model(micro)).backward()   # per-micro-batch mean loss, not divided by K
            opt.accumulate()                    # folds p.grad into the window, clears p.grad
        opt.step()

Calling ``step()`` without ``accumulate()`` uses ``p.grad`` as the step's gradient.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any, cast, overload

import torch

from mlfop_megatron.config import FoldingConfig, MLFOPConfig, SOAPConfig
from mlfop_megatron.core import fused
from mlfop_megatron.core.batched import BatchedBlocks, ClassWindow, all_finite
from mlfop_megatron.core.batched_folding import BatchedWindowFolder
from mlfop_megatron.core.diagnostics import (
    GroupSums,
    check_groups,
    group_block_rows,
    summarize_grad_diagnostics,
)
from mlfop_megatron.core.folding import (
    LevelDiagnostics,
    WindowFolder,
    WindowMetric,
    WindowOutput,
)
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.core.precision import fp32_matmuls
from mlfop_megatron.core.soap import (
    block_layout,
    init_state,
    needs_master,
    rotate,
    soap_step,
    state_dtype,
)

STATS_KEY = "__mlfop_stats__"
# Per-group options that may differ between param groups (SOAPConfig's math options; the
# engine choice ``batched`` is the optimizer's, from its config).
_GROUP_OPTIONS = tuple(k for k in asdict(SOAPConfig()) if k != "batched")


def _rotation(state: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """rot(X) of one block under its state's bases (the state is read at call time)."""
    return lambda x: rotate(x, state)


class MLFOPSOAP(torch.optim.Optimizer):
    """SOAP preconditioning + FOP multi-level folding of accumulated micro-step gradients.

    Folding is opt-in (``FoldingConfig.enabled``, keyword ``enabled=True``); by default the
    step preconditions the plain mean of the window's micro-step gradients.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        config: MLFOPConfig | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = MLFOPConfig.from_kwargs(**options)
        elif options:
            raise ValueError("pass either config=MLFOPConfig(...) or keyword options, not both")
        self.config = config
        self.folding_config: FoldingConfig = config.folding
        self.schedule = LevelSchedule.from_config(config.folding)
        defaults = {name: getattr(config.soap, name) for name in _GROUP_OPTIONS}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._group_config(group)  # validate per-group overrides now
        self.counters = LinalgCounters()
        self.skipped_steps = 0
        self.steps = 0
        self._folder: WindowFolder | BatchedWindowFolder | None = None
        self._engine: BatchedBlocks | None = None  # shape classes of the last window's params
        self._engine_params: list[torch.Tensor] = []
        self._window_params: list[torch.Tensor] = []
        self.last_diagnostics: list[LevelDiagnostics] = []
        self.last_eta: torch.Tensor | None = None  # eta* per window param (step_size=eta_star)
        self._armed_groups: tuple[int, ...] | None = None
        self._groups: GroupSums | None = None
        self.last_grad_rows: torch.Tensor | None = None  # per param, last armed window
        self._last_grad_window: tuple[int, ...] | None = None

    # ----------------------------------------------------------------- helpers
    def _group_config(self, group: dict[str, Any]) -> SOAPConfig:
        """The validated SOAP config of a param group (groups may override any option).

        Validated with the optimizer's engine (``batched``), so that a group's option the
        per-block engine cannot honour (``refresh_budget``) is refused, not ignored.
        """
        options = {name: group[name] for name in _GROUP_OPTIONS}
        return SOAPConfig(**options, batched=self.config.soap.batched)

    def _param_state(self, p: torch.Tensor, cfg: SOAPConfig) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            layout = block_layout(p.shape, cfg)
            master = p.detach() if needs_master(p.dtype) else None
            state.update(init_state(layout, state_dtype(p.dtype), p.device, master=master))
        return state

    def _matrix_grad(
        self, p: torch.Tensor, grad: torch.Tensor, convert: bool = True
    ) -> torch.Tensor:
        """Gradient as the block's matrix view, in state precision (``convert``) or its own.

        No op at all for a detached gradient already of that shape and dtype (a 2-D fp32
        param): the batched engine's gradient collection stays O(shape classes) in ops and
        converts a low-precision gradient once per class, when stacking.
        """
        shape = self.state[p]["exp_avg"].shape
        if grad.requires_grad:
            grad = grad.detach()
        if grad.shape != shape:
            grad = grad.reshape(shape)
        dtype = state_dtype(p.dtype)
        return grad.to(dtype) if convert and grad.dtype != dtype else grad

    def _trainable(self) -> list[tuple[torch.Tensor, SOAPConfig]]:
        """(param, its group's config) for every trainable param, in group order."""
        out: list[tuple[torch.Tensor, SOAPConfig]] = []
        for group in self.param_groups:
            cfg = self._group_config(group)
            out.extend((p, cfg) for p in group["params"] if p.requires_grad)
        return out

    def _batched_engine(self, params: Sequence[torch.Tensor]) -> BatchedBlocks:
        """Shape classes of ``params`` (classes split by param group).

        Rebuilt when the set of params changed or their states were replaced
        (load_state_dict).
        """
        states = [self.state[p] for p in params]
        engine = self._engine
        same = len(self._engine_params) == len(params) and all(
            a is b for a, b in zip(self._engine_params, params)
        )
        if engine is None or not same or not engine.matches(states):
            index = {p: g for g, group in enumerate(self.param_groups) for p in group["params"]}
            cfgs = [self._group_config(self.param_groups[index[p]]) for p in params]
            views = [p.data.view(s["exp_avg"].shape) for p, s in zip(params, states)]
            engine = BatchedBlocks(states, views, cfgs, [index[p] for p in params])
            self._engine = engine
            self._engine_params = list(params)
        return engine

    def _groups_by_param(self) -> dict[torch.Tensor, tuple[SOAPConfig, dict[str, Any]]]:
        return {
            p: (self._group_config(group), group)
            for group in self.param_groups
            for p in group["params"]
        }

    # ------------------------------------------------------------ accumulation
    def request_grad_diagnostics(self, groups: Sequence[int] | None = None) -> None:
        """Per-group gradient diagnostics of the next window.

        Read them in ``stats()["grad"]`` after its step; see core/diagnostics.py.
        ``groups``: the group id of each of the window's micro-steps in order (e.g. 0 image,
        1 text); None: one group. Costs one gradient-sized buffer per group and param, for
        this window only.
        """
        if self._folder is not None:
            raise RuntimeError("request grad diagnostics before the window's first accumulate()")
        k = self.schedule.accumulation_steps
        self._armed_groups = check_groups([0] * k if groups is None else list(groups), k)

    @fp32_matmuls()
    def accumulate(self) -> None:
        """Fold the current ``p.grad`` of every param into the window as one micro-step.

        Clears ``p.grad`` so the next backward produces a fresh micro-step gradient.
        """
        pairs = [(p, cfg) for p, cfg in self._trainable() if p.grad is not None]
        if self._folder is None:
            if not pairs:
                raise ValueError("accumulate() found no parameter with a gradient")
            params = [p for p, _ in pairs]
            states = [self._param_state(p, cfg) for p, cfg in pairs]
            self._window_params = params
            if self.config.soap.batched:
                self._folder = BatchedWindowFolder(
                    self.schedule, self.folding_config, self._batched_engine(params)
                )
            else:
                self._folder = WindowFolder(
                    self.schedule,
                    self.folding_config,
                    rotate_fns=[_rotation(s) for s in states],
                    # computed at the first fold or diagnostics read (WindowMetric)
                    metric_diags=WindowMetric.of_states(states, [cfg for _, cfg in pairs]),
                )
        elif [p for p, _ in pairs] != self._window_params:
            raise ValueError(
                "the set of parameters with gradients changed inside an accumulation window; "
                "every micro-step must produce gradients for the same parameters"
            )
        # pairs hold only params whose grad is set. The batched folder converts per class.
        batched = isinstance(self._folder, BatchedWindowFolder)
        grads = [self._matrix_grad(p, cast(torch.Tensor, p.grad), not batched) for p, _ in pairs]
        if self._armed_groups is not None:  # every micro-step is a segment of its own
            if self._groups is None:
                self._groups = GroupSums(self._armed_groups, len(pairs))
            converted = [self._matrix_grad(p, g) for (p, _), g in zip(pairs, grads)]
            self._groups.add_segment(self._folder.micro_steps, 1, converted)
        self._folder.add_micro_step(grads)
        for p, _ in pairs:
            p.grad = None

    # -------------------------------------------------------------------- step
    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    @fp32_matmuls()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one optimizer step; a non-finite gradient skips it without touching state."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, window, finite = self._collect_gradients()
        self._folder = None
        self._groups = None
        self._armed_groups = None
        if not params:
            return loss
        if not bool(finite):
            self.skipped_steps += 1
            self.last_grad_rows = self._last_grad_window = None
            return loss
        groups = self._groups_by_param()
        if isinstance(window, ClassWindow):
            lrs = [groups[p][1]["lr"] for p in params]
            wds = [groups[p][1]["weight_decay"] for p in params]
            assert self._engine is not None  # _collect_gradients built it for this window
            self._engine.step(window, lrs, wds, self.counters)
            self.steps += 1
            return loss
        for i, (p, g) in enumerate(zip(params, window.grads)):
            cfg, group = groups[p]
            state = self.state[p]
            soap_step(
                p.data.view(state["exp_avg"].shape),
                g,
                state,
                cfg,
                self.counters,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                **window.block(i),
            )
        self.steps += 1
        return loss

    def _collect_gradients(
        self,
    ) -> tuple[list[torch.Tensor], WindowOutput | ClassWindow, torch.Tensor | None]:
        """(params, the window's gradients, finite flag) from the window or from p.grad.

        Per class for the batched engine, per param otherwise.
        """
        if self._folder is not None:
            folder = self._folder
            window: WindowOutput | ClassWindow
            if isinstance(folder, BatchedWindowFolder):
                window = folder.class_output()
            else:
                window = folder.output()
            self.last_diagnostics = folder.diagnostics
            self.last_eta = folder.eta
            self.last_grad_rows = self._last_grad_window = None
            if self._groups is not None:  # before the step: the window's bases and metric
                by_param = self._groups_by_param()
                self.last_grad_rows = group_block_rows(
                    self._groups,
                    folder.rotate_fns,
                    folder.metric_diags,
                    folder.estimate_rot if folder.schedule.num_folds else None,
                    folder.eta,
                    [by_param[p][1]["lr"] for p in self._window_params],
                )
                self._last_grad_window = self._groups.groups
            return self._window_params, window, folder.finite
        if self.schedule.accumulation_steps > 1:
            raise ValueError(
                f"accumulation_steps={self.schedule.accumulation_steps} but step() was called "
                "without accumulate(); call accumulate() after each micro-batch backward, or "
                "set accumulation_steps=1"
            )
        params, grads = [], []
        batched = self.config.soap.batched
        for p, cfg in self._trainable():
            if p.grad is None:
                continue
            self._param_state(p, cfg)
            params.append(p)
            grads.append(self._matrix_grad(p, p.grad, not batched))
        self.last_diagnostics = []
        self.last_eta = None
        self.last_grad_rows = self._last_grad_window = None
        if params and batched:
            stacks = self._batched_engine(params).stack(grads)
            return params, ClassWindow(stacks, [None] * len(stacks)), all_finite(stacks)
        flags = [torch.isfinite(g).all() for g in grads]
        finite = torch.stack(flags).all() if flags else torch.tensor(True)
        return params, WindowOutput(grads, [None] * len(grads)), finite

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Counters and the last window's per-level folding diagnostics.

        With ``compile`` on in any group, also the compiled kernels so far (``fused.KERNELS``:
        process-wide) and the seconds their compiles took.
        """
        out: dict[str, Any] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        out.update(self.counters.as_dict())
        out["levels"] = [d.summary() for d in self.last_diagnostics]
        if any(group["compile"] for group in self.param_groups):  # the process's kernels
            kernels = fused.KERNELS.stats()
            out.update(
                compiled_kernels=kernels["compiles"], compile_seconds=kernels["compile_seconds"]
            )
        if self.last_eta is not None and self.last_eta.numel():
            eta = self.last_eta.double()
            out.update(
                eta_mean=float(eta.mean()), eta_min=float(eta.min()), eta_max=float(eta.max())
            )
        if self._last_grad_window is not None:
            groups = self._last_grad_window
            counts = [groups.count(m) for m in range(max(groups) + 1)]
            assert self.last_grad_rows is not None  # set together with _last_grad_window
            out["grad"] = summarize_grad_diagnostics(
                self.last_grad_rows.sum(dim=0), counts, len(groups)
            )
        return out

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state plus the step and linalg counters (outside a window only)."""
        if self._folder is not None:
            raise RuntimeError(
                "state_dict() called inside an accumulation window; checkpoint after step()"
            )
        # torch types ``state`` as keyed by tensors; the stats ride along under a string key.
        state: dict[Any, Any] = self.state
        state[STATS_KEY] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "counters": self.counters.as_dict(),
        }
        try:
            return super().state_dict()
        finally:
            del state[STATS_KEY]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load; tensors keep their saved dtype (torch would cast factors to the param dtype)."""
        saved = copy.deepcopy(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint from before an option existed
            for name in _GROUP_OPTIONS:
                group.setdefault(name, self.defaults[name])
        state: dict[Any, Any] = self.state  # (replaced by the load above: take it now)
        stats = state.pop(STATS_KEY, None)
        if stats is not None:
            self.steps = stats["steps"]
            self.skipped_steps = stats["skipped_steps"]
            self.counters = LinalgCounters(**stats["counters"])
        id_to_param = {}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                id_to_param[index] = p
                index += 1
        for key, value in saved["state"].items():
            if key in id_to_param:
                p = id_to_param[key]
                self.state[p] = {
                    k: v.to(p.device) if torch.is_tensor(v) else v for k, v in value.items()
                }
        self._folder = None
        self._engine = None
