"""ZeRO-1 AdamW for the non-matrix params: state and fp32 main weights sharded over DP ranks.

The Adam-side params (embeddings, output layer, norms, biases) of one dtype are laid out in a
flat buffer of the params' dtype, padded to a multiple of the data-parallel size N; the
params' storage is re-pointed into it (as Megatron's DistributedOptimizer does with its param
buffer). A tied (pipeline-shared) embedding gets a buffer of its own, so the first and the last
stage slice it the same way. DP rank r owns the contiguous slice ``[r*S, (r+1)*S)`` (S =
padded size / N) and keeps AdamW state (exp_avg, exp_avg_sq) for it only, plus fp32 main
weights when the params are bf16 (fp32/fp64 params are their own main weights: the owned slice
of the buffer). A step runs AdamW (the same kernel as the replicated path, per element the same
ops) on the owned slice, then ONE ``all_gather_into_tensor`` per buffer, in the params' dtype,
writes every rank's params; with ``CommConfig.overlap_param_gather`` it is left in flight and
waited by the forward pre-hooks of ``megatron/param_gather.py``.

Gradients, two ways:

* reduce-scattered (``take_over_grad_sync``, the default with owner-reduced levels): once per
  window the ``main_grad`` of a buffer's params are packed in the buffer's order (padding
  zero), pre-scaled as Megatron would, and reduce-scattered, so rank r receives exactly the
  DP sum of its slice (Megatron DistributedOptimizer's 4r B + the all-gather's 2r B per bf16
  element). The slice is written back into the owned range of ``main_grad`` (as Megatron's
  in-place reduce-scatter leaves it), so finalize_model_grads' later TP / pipeline-embedding
  all-reduces sum the right values there; the rest of ``main_grad`` is this rank's local sum
  and is never read. ``get_parameters()`` returns the owned fp32 pieces (with the model
  param's TP / shared attributes, ``.grad`` = the owned ``main_grad`` range), and every rank
  counts them in the global norm and inf check (``grads_sharded``): each element once.
* all-reduced by the DDP (replicated ``main_grad``): ``get_parameters()`` exposes one
  "carrier" per model param, a view of its ``main_grad`` (no copy) with ``.grad`` set to it
  and the model param's attributes, counted by DP rank 0 only.

Checkpoints: every owned piece becomes ShardedTensors of the model param's global tensor
(irregular chunks, keys as MainParamAdamW's), so a checkpoint written at DP=N loads at any DP
size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig

from mlfop_megatron.distributed.owner_buffer import all_gather_flat, reduce_scatter_flat
from mlfop_megatron.megatron import compat, fused_kernels
from mlfop_megatron.megatron.param_gather import PendingParamGathers

STATE_PREFIX = "optimizer.state"
MOMENTS = ("exp_avg", "exp_avg_sq")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _all_gather(output: torch.Tensor, shard: torch.Tensor, group: Any, async_op: bool) -> Any:
    """All-gather into one tensor (a module attribute, so tests can count the calls)."""
    return all_gather_flat(output, shard, group, async_op=async_op)


def flat_range_boxes(
    shape: tuple[int, ...], start: int, end: int
) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Split the flat range [start, end) of a C-contiguous ``shape`` into rectangular boxes.

    Returns (offset, box shape, flat start) per box, in flat order; each box is contiguous in
    memory, so it is a reshaped slice of the flat range.
    """
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,), start)]
    row = 1
    for s in shape[1:]:
        row *= s
    first, last = start // row, (end - 1) // row
    if start % row == 0 and end % row == 0:
        return [((first,) + (0,) * (len(shape) - 1), (end // row - first,) + shape[1:], start)]
    if first == last:  # inside one row
        return [
            ((first,) + off, (1,) + sub, first * row + flat)
            for off, sub, flat in flat_range_boxes(
                shape[1:], start - first * row, end - first * row
            )
        ]
    head_end = (first + 1) * row if start % row else start
    tail_start = last * row if end % row else end
    boxes = flat_range_boxes(shape, start, head_end) if start < head_end else []
    if head_end < tail_start:
        boxes += flat_range_boxes(shape, head_end, tail_start)
    if tail_start < end:
        boxes += flat_range_boxes(shape, tail_start, end)
    return boxes


class _Piece:
    """The part [start, end) of one model param (flat) that this rank owns in a buffer."""

    def __init__(
        self,
        index: int,
        param: torch.nn.Parameter,
        start: int,
        end: int,
        main: torch.nn.Parameter,
        shard_offset: int,
    ) -> None:
        self.index = index  # position of the param in the optimizer's param list
        self.param = param
        self.start, self.end = start, end
        self.main = main  # fp32 view into the owned main slice
        self.shard_offset = shard_offset  # where [start, end) sits in the owned slice

    def owned_grad(self) -> torch.Tensor:
        """The owned range of the model param's ``main_grad`` (flat view)."""
        return compat.main_grad(self.param).view(-1)[self.start : self.end]


class _Buffer:
    """Flat storage of one dtype's params, padded to a multiple of the DP size, and its shard."""

    def __init__(
        self,
        params: list[tuple[int, torch.nn.Parameter]],
        group: Any,
        rank: int,
        size: int,
    ) -> None:
        first = params[0][1]
        self.params = [p for _, p in params]
        self.dtype, self.device = first.dtype, first.device
        self.numel = sum(p.numel() for _, p in params)
        self.shard_numel = -(-self.numel // size)  # ceil
        self.padding = self.shard_numel * size - self.numel
        self.group, self.rank = group, rank
        self.data = torch.zeros(self.shard_numel * size, dtype=self.dtype, device=self.device)
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        self.shard = self.data[lo:hi]
        offset = 0
        with torch.no_grad():
            for _, p in params:
                n = p.numel()
                self.data[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = self.data[offset : offset + n].view(p.shape)
                offset += n
        # fp32/fp64 params are their own main weights; bf16/fp16 ones get an fp32 copy of the
        # owned slice.
        self.separate_main = self.dtype in LOW_PRECISION
        self.main = self.shard.float() if self.separate_main else self.shard
        self.pieces: list[_Piece] = []
        offset = 0
        with torch.no_grad():
            for index, p in params:
                n = p.numel()
                a, b = max(offset, lo), min(offset + n, hi)
                if a < b:
                    main = torch.nn.Parameter(self.main[a - lo : b - lo])
                    self.pieces.append(_Piece(index, p, a - offset, b - offset, main, a - lo))
                offset += n
        self.world_size = size
        self._grad_pending: tuple[Any, torch.Tensor] | None = None

    # -------------------------------------------------------------- gradients
    def start_grad_reduce_scatter(self, scaling: float) -> None:
        """Pack the params' ``main_grad`` in buffer order and reduce-scatter it (async)."""
        grads = [compat.main_grad(p).reshape(-1) for p in self.params]
        if self.padding:
            grads.append(grads[0].new_zeros(self.padding))
        flat = torch.cat(grads)
        if scaling != 1.0:
            flat.mul_(scaling)  # Megatron's pre-scaling: a SUM of these is the DP mean
        if self.world_size == 1:
            self._grad_pending = (None, flat)
            return
        out = flat.new_empty(self.shard_numel)
        work = reduce_scatter_flat(out, flat, self.group, async_op=True)
        self._grad_pending = (work, out)

    def finish_grad_reduce_scatter(self) -> None:
        """Wait, then write the reduced slice into the owned ranges of the params' main_grad."""
        if self._grad_pending is None:
            return
        work, out = self._grad_pending
        self._grad_pending = None
        if work is not None:
            work.wait()
        for piece in self.pieces:
            n = piece.end - piece.start
            piece.owned_grad().copy_(out[piece.shard_offset : piece.shard_offset + n])

    def grad_reduce_scatter_bytes(self) -> int:
        """Bytes one rank sends per step in the grads' reduce-scatter (ring: (N-1)/N)."""
        if self.world_size == 1:
            return 0
        grad = compat.main_grad(self.params[0])
        return (self.world_size - 1) * self.shard_numel * grad.element_size()

    # ------------------------------------------------------------------ params
    def gather(self, async_op: bool = False) -> Any:
        """Write the updated owned slice into every rank's params: one all-gather.

        Returns the collective's work handle when ``async_op`` (None on one rank).
        """
        if self.separate_main:
            self.shard.copy_(self.main)  # one rounding to the params' dtype
        if self.world_size > 1:
            return _all_gather(self.data, self.shard, self.group, async_op)
        return None

    def reload(self) -> None:
        """Main weights from the (loaded) params."""
        if self.separate_main:
            self.main.copy_(self.shard)


class ShardedMainParamAdamW(MegatronOptimizer):
    """AdamW (decoupled weight decay per group) with ZeRO-1 sharding over a DP group."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        config: OptimizerConfig,
        group: Any,
    ) -> None:
        self.dp_group = group
        self.dp_rank = dist.get_rank(group)
        self.dp_size = dist.get_world_size(group)
        self.model_params: list[torch.nn.Parameter] = [p for g in groups for p in g["params"]]
        for p in self.model_params:
            if not hasattr(p, "main_grad"):
                raise ValueError(
                    "ShardedMainParamAdamW reads DDP's main_grad: wrap the model in "
                    "FoldingDistributedDataParallel before building the optimizer"
                )
        group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
        # One buffer per dtype; a pipeline-tied embedding alone, so that the first and the
        # last stage shard it identically (their embedding all-reduce then sums owned ranges).
        by_key: dict[tuple[str, bool], list[tuple[int, torch.nn.Parameter]]] = {}
        for index, p in enumerate(self.model_params):
            key = (str(p.dtype), bool(getattr(p, "shared_embedding", False)))
            by_key.setdefault(key, []).append((index, p))
        self.buffers = [
            _Buffer(ps, group, self.dp_rank, self.dp_size) for _, ps in sorted(by_key.items())
        ]
        self.pieces = [piece for b in self.buffers for piece in b.pieces]
        self._data_ptrs = [p.data_ptr() for p in self.model_params]
        # Every rank has every group (maybe without params), so the LR scheduler and the
        # checkpoint's param_groups agree across ranks.
        inner_groups = [dict(g, params=[]) for g in groups]
        for piece in self.pieces:
            inner_groups[group_of[id(piece.param)]]["params"].append(piece.main)
        adam = fused_kernels.make_adamw(
            inner_groups, config.lr, (config.adam_beta1, config.adam_beta2), config.adam_eps
        )
        super().__init__(adam, config, lambda opt, cfg=None: self._init_state())
        self.is_stub_optimizer = False
        self.steps = 0  # completed steps (the same on every rank, also without pieces)
        self._carriers = [self._carrier(p) for p in self.model_params]
        for piece in self.pieces:  # TP / shared attributes for the norm's filters
            _copy_attributes(piece.param, piece.main)
        self.grads_sharded = False  # see take_over_grad_sync
        self._ddp: Any = None  # the DDP whose grad sync this optimizer took over
        self._param_gathers: PendingParamGathers | None = None  # see defer_param_gather
        self._loss_scale = torch.ones((), dtype=torch.float32, device=self.buffers[0].device)

    @staticmethod
    def _carrier(p: torch.nn.Parameter) -> torch.nn.Parameter:
        """A view of p.main_grad exposing it as .grad, with p's attributes (for norm filters)."""
        carrier = torch.nn.Parameter(compat.main_grad(p), requires_grad=False)
        _copy_attributes(p, carrier)
        return carrier

    # ------------------------------------------------------- wiring (factory)
    def take_over_grad_sync(self, ddp: Any) -> None:
        """Reduce-scatter this optimizer's grads into its slices instead of the DDP all-reduce.

        ``ddp`` is the FoldingDistributedDataParallel with owner-reduced levels; every buffer's
        params must be reduced by it over this optimizer's DP group with one pre-scaling.
        """
        mine = dist.get_process_group_ranks(self.dp_group)
        for buffer in self.buffers:
            reductions = {ddp.grad_reduction(p) for p in buffer.params}
            if len(reductions) != 1:
                raise ValueError(
                    "the params of one ZeRO-1 Adam buffer are reduced over different groups or "
                    "scalings by the DDP; use get_mlfop_optimizer(shard_adam=False)"
                )
            group, scaling = reductions.pop()
            if dist.get_process_group_ranks(group) != mine:
                raise ValueError(
                    "the DDP reduces these Adam params over another group than the one "
                    "ShardedMainParamAdamW shards them over; use shard_adam=False"
                )
            ddp.take_over_grad_sync(
                buffer.params,
                lambda b=buffer, s=scaling: b.start_grad_reduce_scatter(s),
                buffer.finish_grad_reduce_scatter,
            )
        self._ddp = ddp
        self.grads_sharded = True

    def defer_param_gather(self, gathers: PendingParamGathers) -> None:
        """Leave the step's all-gathers in flight, registered with ``gathers`` (see module)."""
        self._param_gathers = gathers

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers still in flight (no-op when none)."""
        if self._param_gathers is not None:
            self._param_gathers.finish_all()

    # ----------------------------------------------------------------- contract
    def get_parameters(self) -> list[torch.nn.Parameter]:
        """What the chain counts in the norm and clips: each gradient element once over DP.

        Reduce-scattered grads: the owned fp32 pieces (``.grad``: their reduced range);
        all-reduced: one carrier per model param (full DP-mean gradients, DP rank 0 counts).
        """
        if self.grads_sharded:
            return [piece.main for piece in self.pieces]
        return self._carriers

    def _check_storage(self) -> None:
        """Fail before any update if a param's storage left the buffer (e.g. model.to())."""
        for p, ptr in zip(self.model_params, self._data_ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"an Adam param {tuple(p.shape)} no longer lives in ShardedMainParamAdamW's "
                    "buffer (its .data was replaced, e.g. by model.to()/cuda() or "
                    "load_state_dict(assign=True)): move/load the model before building the "
                    "optimizer, or use get_mlfop_optimizer(shard_adam=False)"
                )

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Point the owned main pieces (and the carriers) at the DP-reduced ``main_grad``."""
        self._check_storage()
        self.finish_param_sync()  # a step without a forward since the last one
        if self._ddp is not None:  # the reduce-scatter into the slices has landed
            self._ddp.wait_unfolded_grad_sync()
        if not self.grads_sharded:
            for carrier, p in zip(self._carriers, self.model_params):
                carrier.data = compat.main_grad(p)
                carrier.grad = compat.main_grad(p)
        for piece in self.pieces:
            piece.main.grad = piece.owned_grad()
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """AdamW on the owned pieces, then one all-gather per buffer into every rank's params.

        The previous step's gathers were waited in ``prepare_grads``.
        """
        if self.pieces:
            self.optimizer.step()
        deferred = self._param_gathers is not None
        for buffer in self.buffers:
            work = buffer.gather(async_op=deferred)
            if work is not None and self._param_gathers is not None:
                self._param_gathers.add(buffer.params, work.wait)
        self.steps += 1
        return True

    @torch.no_grad()
    def step(self):
        """A full step through the chained optimizer's contract (norm, inf check, clipping)."""
        from mlfop_megatron.megatron.optimizer import MLFOPChainedOptimizer

        return MLFOPChainedOptimizer([self]).step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the pieces' and carriers' gradients (``main_grad`` is the DDP's)."""
        for piece in self.pieces:
            piece.main.grad = None
        for carrier in self._carriers:
            carrier.grad = None

    def get_loss_scale(self) -> torch.Tensor:
        """1 (no loss scaling: fp32/bf16)."""
        return self._loss_scale

    @torch.no_grad()
    def reload_model_params(self, state_dict: Any = None) -> None:
        """Refill the fp32 main weights from the (loaded) params."""
        self.finish_param_sync()
        for buffer in self.buffers:
            buffer.reload()

    # ------------------------------------------------------------------- memory
    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: Adam moments, step counters, fp32 mains."""
        total = sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        return total + sum(
            b.main.numel() * b.main.element_size() for b in self.buffers if b.separate_main
        )

    def padding(self) -> list[int]:
        """Padding elements per buffer (whole buffer; each rank holds padding / N of it)."""
        return [b.padding for b in self.buffers]

    def grad_reduce_scatter_bytes_per_step(self) -> int:
        """Bytes each rank sends in the grads' reduce-scatters (0 when the DDP all-reduces)."""
        if not self.grads_sharded:
            return 0
        return sum(b.grad_reduce_scatter_bytes() for b in self.buffers)

    def all_gather_bytes_per_step(self) -> int:
        """Bytes each rank receives from the step's all-gathers ((N-1)/N of each buffer)."""
        return sum(
            (b.data.numel() - b.shard_numel) * b.data.element_size()
            for b in self.buffers
            if self.dp_size > 1
        )

    # ------------------------------------------------------------- checkpoints
    def _init_state(self) -> None:
        """Create zero moments and step counters so a loading template has every tensor."""
        for piece in self.pieces:
            state = self.optimizer.state[piece.main]
            if "exp_avg" not in state:
                for key in MOMENTS:
                    state[key] = torch.zeros_like(piece.main)
            if "step" not in state and not _step_in_group(self.optimizer):
                state["step"] = torch.tensor(float(self.steps), dtype=_step_dtype())

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (not reshardable; the dist_checkpointing path reshards)."""
        self.finish_param_sync()
        return {
            "optimizer": self.optimizer.state_dict(),
            "fp32_shards": [b.main.detach().clone() for b in self.buffers if b.separate_main],
            "steps": self.steps,
            "dp_size": self.dp_size,
        }

    def sharded_state_dict(
        self, model_sharded_state_dict: Any, is_loading: bool = False, metadata: Any = None
    ) -> dict[str, Any]:
        """Owned pieces as ShardedTensors of each param's global tensor (see module docstring)."""
        self.finish_param_sync()
        self._init_state()  # a template (loading, or before the first step) has every tensor
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.model_params)
        tensors: dict[str, Any] = {}
        for k, piece in enumerate(self.pieces):
            model = id_map.get(piece.index)
            if model is None:
                raise ValueError(
                    f"Adam param {tuple(piece.param.shape)} is not in the model's sharded state "
                    "dict (pass keep_vars=True / the DDP module's sharded_state_dict())"
                )
            if not isinstance(model, ShardedTensor):
                raise NotImplementedError(
                    f"param {model.key} is saved through a {type(model).__name__}; its sharded "
                    "Adam state cannot be mapped to it: use get_mlfop_optimizer(shard_adam=False)"
                )
            fields = dict(self.optimizer.state[piece.main])
            values = {key: fields[key] for key in MOMENTS}
            if piece.param.dtype in LOW_PRECISION:  # separate fp32 main weights
                values["fp32_param"] = piece.main.data
            tensors[str(k)] = {
                key: _piece_tensors(model, f"{STATE_PREFIX}.{key}.{model.key}", value, piece)
                for key, value in values.items()
            }
        return {
            "pieces": tensors,
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ],
            "steps": self.steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dist_checkpointing-loaded sharded_state_dict() (or this rank's state_dict())."""
        self.finish_param_sync()
        if "optimizer" in state_dict:  # per-rank state_dict()
            if state_dict["dp_size"] != self.dp_size:
                raise ValueError(
                    f"this Adam state_dict was saved at DP={state_dict['dp_size']}, not "
                    f"DP={self.dp_size}: reshard through dist_checkpointing (save_checkpoint)"
                )
            self.optimizer.load_state_dict(state_dict["optimizer"])
            mains = iter(state_dict["fp32_shards"])
            for b in self.buffers:
                if b.separate_main:
                    b.main.copy_(next(mains))
            self.steps = int(state_dict["steps"])
            return
        self._init_state()
        if len(state_dict["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"checkpoint has {len(state_dict['param_groups'])} Adam param groups, this "
                f"optimizer {len(self.optimizer.param_groups)}: the model's params differ"
            )
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.steps = int(state_dict["steps"])
        for k, piece in enumerate(self.pieces):
            state = self.optimizer.state[piece.main]
            loaded = state_dict["pieces"][str(k)]
            for key, boxes in loaded.items():
                target = piece.main.data if key == "fp32_param" else state[key]
                _copy_boxes(target, boxes, piece)
            if "step" in state:
                state["step"] = torch.tensor(float(self.steps), dtype=state["step"].dtype)
        if _step_in_group(self.optimizer):
            for group in self.optimizer.param_groups:
                group["step"] = self.steps


def _copy_attributes(source: torch.nn.Parameter, target: torch.Tensor) -> None:
    """Copy a model param's public attributes (TP, shared, ...) but ``main_grad``."""
    for key, value in vars(source).items():
        if key != "main_grad" and not key.startswith("_"):
            setattr(target, key, value)


def _step_dtype() -> torch.dtype:
    """Dtype torch AdamW gives its ``step`` counters (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step_in_group(optimizer: torch.optim.Optimizer) -> bool:
    """Apex FusedAdam keeps ``step`` in the param group instead of per param."""
    return not isinstance(optimizer, torch.optim.AdamW)


def _piece_tensors(
    model: ShardedTensor, key: str, value: torch.Tensor, piece: _Piece
) -> dict[str, ShardedTensor]:
    """A piece's slice of a param's state as ShardedTensors: one per box ("b0", "b1", ...)."""
    # Prepended axes (e.g. the layer axis of stacked layers) become leading size-1 axes.
    lead = tuple(model.global_offset[: model.prepend_axis_num])
    base = model.global_offset[model.prepend_axis_num :]
    rid = model.replica_id
    # Pieces are disjoint over DP: the DP coordinate of the replica id is 0 on every rank.
    replica = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
    flat = value.reshape(-1)
    out = {}
    boxes = flat_range_boxes(tuple(model.local_shape), piece.start, piece.end)
    for i, (offset, shape, start) in enumerate(boxes):
        n = 1
        for s in shape:
            n *= s
        lo = start - piece.start
        full_shape = (1,) * len(lead) + tuple(shape)
        out[f"b{i}"] = ShardedTensor(
            key=key,
            data=flat[lo : lo + n].view(full_shape),
            dtype=value.dtype,
            local_shape=full_shape,
            global_shape=tuple(model.global_shape),
            global_offset=lead + tuple(b + o for b, o in zip(base, offset)),
            axis_fragmentations=None,
            replica_id=replica,
            allow_shape_mismatch=model.allow_shape_mismatch,
        )
    return out


def _copy_boxes(target: torch.Tensor, boxes: dict[str, Any], piece: _Piece) -> None:
    """Copy loaded boxes ("b0", "b1", ... in flat order) into the piece's flat state tensor."""
    flat, at = target.view(-1), 0
    for name in sorted(boxes, key=lambda b: int(b[1:])):
        box = boxes[name]
        box = box.data if isinstance(box, ShardedTensor) else box
        n = box.numel()
        flat[at : at + n].copy_(box.reshape(-1))
        at += n
    if at != piece.end - piece.start:
        raise ValueError(f"loaded {at} elements for a piece of {piece.end - piece.start}")


def adam_state_bytes(optimizer: Any) -> int:
    """Per-rank bytes of an Adam-side optimizer's state (sharded, MainParamAdamW, FP32)."""
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    total = sum(
        t.numel() * t.element_size()
        for state in optimizer.optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    for main in getattr(optimizer, "main_params", ()):
        total += main.numel() * main.element_size()
    return total


def owned_adam_state(
    optimizers: list[Any], names: dict[Any, str]
) -> dict[str, list[tuple[int, int, dict[str, torch.Tensor]]]]:
    """This rank's ZeRO-1 Adam pieces: {param name: [(start, end, {field: copy})]} (tests)."""
    out: dict[str, list[tuple[int, int, dict[str, torch.Tensor]]]] = {}
    for opt in optimizers:
        if not isinstance(opt, ShardedMainParamAdamW):
            continue
        for piece in opt.pieces:
            fields = {
                k: v.detach().clone()
                for k, v in opt.optimizer.state[piece.main].items()
                if k in MOMENTS
            }
            fields["main"] = piece.main.detach().clone()
            out.setdefault(names[piece.param], []).append((piece.start, piece.end, fields))
    return out
