"""Peak memory per rank of an ML-FOP-SOAP Megatron job, by the categories the tracker measures.

``benchmarks/memory.py`` measures live bytes per rank with PyTorch's ``MemTracker`` through
one accumulation window and optimizer step, by category: params, grads (Megatron's DDP grad
buffer, ``main_grad``), optimizer state (SOAP state of the owned blocks, ZeRO-1 Adam state,
the refresh's null-probe cache) and transient (everything allocated inside the window and the
step). This module models the same categories from the shapes alone (no torch), for the tiny
GPT of the tests (``tests/test_memory_model.py`` checks it against the tracker, folding on
and off) and for Llama-3-8B / 70B in ``mlfop-plan``. Per rank r, with its owned blocks (the
assignment the engines build) in shape classes c (blocks of equal shape, stacked by the
batched engine):

* ``S`` = 4 B x the owned blocks' elements (fp32 gradient stacks), ``g_max`` = 4 B x the
  largest class stack, ``B`` = 4 B x the owned bases (m^2 per rotated left side, n^2 per
  rotated right side), ``b_max`` = 4 B x the largest (class, side) basis stack, ``seg`` =
  4 B x the padded owner segment of the level reduce-scatter.

Folding on (``FoldingConfig.enabled`` with at least one fold: several levels):

* window buffers (while the window folds): the last level's class stacks (S,
  ``ShardedSOAP._class_stacks``), the rotated estimate (S, ``batched.rotate``) and a fold's
  transient (:func:`fold_transient`: the eager chains of ``core/fused.py`` keep four
  temporaries live, the SOAP metric made from v among them, of the whole class up to 4 MiB,
  of a quarter of its blocks above: 4 g_max or g_max, the latter assuming the largest class
  has four blocks or more; compiled chains have none; nothing of it outlives the fold, and
  the level's reduce buffers are gone when it runs: measured): 2 S, plus the larger of the
  level buffers and the fold's transient; at the step the estimate's two forms are left
  (2 S). No metric stack: the chains make sqrt(v_hat) + eps from v (``fused.metric``; it
  was S more, kept from the first fold to the step, until 2026-12-07).
* last fold: both estimates' two forms (4 S) and the fold's transient; the last level's
  received segment is freed once stacked (``ShardedSOAP.fold_owned_level`` empties the
  caller's list of its views; until 2026-12-08 the caller's references kept it, seg more).
  Since the refresh runs in waves it is the run's peak at small DP on the tiny GPT.
* level buffers (fwd/bwd phase): the packed owner-ordered send buffers of the level
  reduce-scatter in flight and this owner's received segment (seg), alive until the next
  level boundary waits; at DP=1 the packed buffer only (S, reduced in place). In G buckets
  (``CommConfig.level_buckets``, ``LevelReducer``: bucket g = run g of every owner's
  segment, equal runs cut inside blocks: ``comm_config.bucket_sizes``)
  bucket g is packed while g-1 is in flight: the largest two consecutive send buffers
  (about 2 N seg / G) + seg; one bucket: N seg + seg.
* transient peak = max(window buffers + level buffers, last fold, 2 S + refresh).

Folding off (the default, ``FoldingConfig.enabled=False``; also K=1 or a single level: one
level, no fold, no rotated estimate, no fold transient):

* level buffers: the one level reduce-scatter, launched by the window's last backward and
  waited for in the step's ``prepare_grads``: send buffers + received segment, about
  2 N seg / G + seg (G = 1: N seg + seg; DP=1: S), as above but once per window.
* stacking (``prepare_grads``, after the wait): the window's one level is copied per class
  (``ShardedSOAP._class_stacks``, S) while the received segment is still alive (seg; DP=1:
  the packed buffer, S): seg + S. No SOAP metric: the folder computes it at its first read
  (``folding.WindowMetric``), and without a fold or grad-group diagnostics nothing reads it.
* step buffers: the class stacks and the statistics gradient rotated in the current bases
  before the early refresh (``BatchedBlocks.step`` phase 1, ``refresh_first``, the default;
  kept until the class steps use it): 2 S (folding on: 2 S, the estimate's two forms). With
  ``refresh_first=False`` the rotation is made per class after the refresh and dropped, so
  2 S is then an upper bound.
* transient peak = max(level buffers, stacking, 2 S + refresh).

Both:

* basis refresh (the step, :func:`refresh_transient`): ``batched.compute_bases`` refreshes in
  waves (``SOAPConfig.refresh_wave``, default 1): the sides of a wave start together and
  finish after one host read, and a wave's new bases and QR temporaries (three n x n stacks
  per block) fit refresh_wave x g_max, or one block's side where that is larger (3 s_max,
  s_max = 4 B x the largest n^2). With ``refresh_wave`` 0 (one wave, as before
  2026-12-08): every new basis is alive at once (B) while the last side holds ``F Q``, its
  sorted copy and the reflectors: B + 4 b_max.
* Not modelled: activations (a few MiB on the tiny GPT, the model's business at scale), the
  fp64 chunks of the grad-norm sum of squares (2 x 8 B x min(g_max / 4 B, 4M), beside the
  step's stacks), except gloo's reduce-scatter scratch (the size of the send buffer; in
  buckets, the tracker sees one bucket's at a time, at its wait:
  ``backend="gloo"``, what the CPU measurement sees; NCCL has none). Windows armed for
  grad-group diagnostics
  (``arm_grad_diagnostics``): their group sums and the metric they read
  before the step (S, then kept through it).
* null-probe cache (``linalg.null_probe``, module level, kept for the process): one fp32
  n x n per distinct rotated dimension n whose factor was ever rank-deficient (counted as
  always: an upper bound; on a large run factors are full rank after the first steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlfop_megatron.distributed.assignment import Assignment, Block
from mlfop_megatron.distributed.comm_config import level_bucket_sizes

FP32 = 4
GRAD_BYTES = 4  # Megatron DDP grad buffer (grad_reduce_in_fp32)


# ``core.fused.EAGER_CHUNK_BYTES`` (this module runs without torch; tests/test_compiled.py
# checks that they agree).
FOLD_CHUNK_BYTES = 4 << 20


def fold_transient(largest_class: int) -> int:
    """Peak bytes of an eager fold's temporaries: four stacks of the class or of its quarter."""
    return 4 * largest_class if largest_class <= FOLD_CHUNK_BYTES else largest_class


@dataclass(frozen=True)
class OwnedShapes:
    """What a rank's owned blocks weigh in the model's terms (bytes)."""

    grads: int  # S: fp32 stacks of the owned blocks' gradients
    largest_class: int  # g_max
    bases: int  # B
    largest_side: int  # b_max
    largest_block_side: int  # s_max: the largest one block's basis (n^2)
    state: int  # factors, bases, moments (+ fp32 masters)
    probe_cache: int

    @classmethod
    def of(
        cls, blocks: Sequence[Block], state_bytes: int = FP32, masters: bool = False
    ) -> OwnedShapes:
        """From the blocks one rank owns; ``masters``: fp32 main weights kept (bf16 params)."""
        classes: dict[tuple[int, int, bool, bool], int] = {}
        for b in blocks:
            key = (b.rows, b.cols, b.rotate_rows, b.rotate_cols)
            classes[key] = classes.get(key, 0) + 1
        numel = sum(b.numel for b in blocks)
        sides = [
            count * d * d
            for (m, n, rl, rr), count in classes.items()
            for d, rotated in ((m, rl), (n, rr))
            if rotated
        ]
        dims = {d for (m, n, rl, rr) in classes for d, r in ((m, rl), (n, rr)) if r}
        factors = sum(sides)  # floats: one factor per side; the basis has as many
        return cls(
            grads=FP32 * numel,
            largest_class=FP32 * max((c * m * n for (m, n, _, _), c in classes.items()), default=0),
            bases=FP32 * factors,
            largest_side=FP32 * max(sides, default=0),
            largest_block_side=FP32 * max((d * d for d in dims), default=0),
            state=state_bytes * (2 * numel + 2 * factors) + (FP32 * numel if masters else 0),
            probe_cache=FP32 * sum(d * d for d in dims),
        )


# ``core.batched.refresh_waves``: a block's side counts three of its n x n stacks at the peak.
WAVE_BLOCK_STACKS = 3


def refresh_transient(owned: OwnedShapes, refresh_wave: float = 1.0) -> int:
    """Peak bytes of a basis refresh (``batched.compute_bases``) beside the step's buffers.

    In waves (``refresh_wave`` > 0, the default 1): at most ``refresh_wave`` x g_max, or one
    block's side (three n x n stacks: its new basis, the QR's input and reflectors) where that
    is larger, as ``refresh_waves`` packs them. One wave (0): every new basis at once (B) while
    the last side also holds ``F Q``, its sorted copy and the reflectors (4 b_max).
    """
    one_wave = owned.bases + 4 * owned.largest_side
    if refresh_wave <= 0:
        return one_wave
    bound = max(refresh_wave * owned.largest_class, WAVE_BLOCK_STACKS * owned.largest_block_side)
    return int(min(one_wave, bound))


@dataclass(frozen=True)
class RankMemory:
    """Modelled bytes of one rank by category (see the module docstring)."""

    params: int
    grads: int
    soap_state: int
    adam_state: int
    probe_cache: int
    window_buffers: int  # folding on: class stacks + rotated estimate (2 S); folding off: 0
    level_buffers: int
    refresh: int
    step_buffers: int = 0  # what of the window is left at the step (2 S, folding on or off)
    stacking: int = 0  # folding off: the one level stacked per class (seg + S); on: 0
    folding: bool = False  # whether the window folds (the terms above follow it)
    level_buckets: int = 1  # collectives per level reduction (CommConfig.level_buckets)
    fold: int = 0  # a fold's transient (fold_transient), not beside the level buffers
    last_fold: int = 0  # folding on: the last fold's peak (4 S + fold + what a level leaves)

    @property
    def opt_state(self) -> int:
        """Persistent optimizer bytes: SOAP state, Adam state, null-probe cache."""
        return self.soap_state + self.adam_state + self.probe_cache

    @property
    def transient_window(self) -> int:
        """Transient peak before the step's update (without activations).

        Folding on: the fwd/bwd phase (window + level buffers, or + a fold's transient).
        Folding off: the one level reduction (last backward to its wait) or its stacking,
        whichever is larger.
        """
        return max(self.window_buffers + max(self.level_buffers, self.fold), self.stacking)

    @property
    def transient_step(self) -> int:
        """Transient peak of the optimizer step (basis refresh)."""
        return self.step_buffers + self.refresh

    @property
    def transient(self) -> int:
        """Transient peak of window + step."""
        return max(self.transient_window, self.last_fold, self.transient_step)

    @property
    def optimizer_peak(self) -> int:
        """Peak optimizer memory: grads + optimizer state + transient (params excluded)."""
        return self.grads + self.opt_state + self.transient

    @property
    def total(self) -> int:
        """Peak total: params + optimizer_peak."""
        return self.params + self.optimizer_peak


def rank_memory(
    assignment: Assignment,
    rank: int,
    params_numel: int,
    adam_numel: int,
    dp: int,
    param_bytes: int = FP32,
    state_bytes: int = FP32,
    owner_segment: int | None = None,
    backend: str = "nccl",
    folding: bool = False,
    level_buckets: int | None = None,
    refresh_wave: float = 1.0,
) -> RankMemory:
    """Modelled peak memory of owner ``rank`` of ``assignment`` (blocks owned over ``dp``).

    ``params_numel``: this rank's params (its TP shard of its PP stage); ``adam_numel``: the
    non-SOAP ones (ZeRO-1 over ``dp``); ``param_bytes`` < 4 keeps fp32 main weights (SOAP
    owned blocks, Adam slices). ``owner_segment``: elements of the padded owner segment of
    the level reduce-scatter (default: the most loaded owner's elements, the padded layout).
    ``backend`` "gloo" adds the scratch gloo's reduce-scatter keeps until its wait (one
    bucket's at a time; CPU runs; NCCL reduces without it). ``folding``: whether the window
    folds (at least one fold: ``LevelSchedule.num_folds > 0``); default off, as
    ``FoldingConfig.enabled``.
    ``level_buckets``: ``CommConfig.level_buckets`` (None: auto, as the optimizer's default).
    ``refresh_wave``: ``SOAPConfig.refresh_wave`` (:func:`refresh_transient`).
    """
    masters = param_bytes < FP32
    owned = OwnedShapes.of(assignment.blocks_of(rank), state_bytes, masters)
    adam_slice = math.ceil(adam_numel / dp)
    adam_state = adam_slice * (2 * state_bytes + (FP32 if masters else 0))
    segment = max(assignment.numel_loads) if owner_segment is None else owner_segment
    buckets = 1
    if dp > 1:
        segs = [[b.numel for b in assignment.blocks_of(r)] for r in range(assignment.world_size)]
        sizes = level_bucket_sizes(level_buckets, segs)
        if len(sizes) == 1:  # one bucket: the padded buffer of the given owner segment
            sizes = [dp * segment]
        buckets = len(sizes)
        # this owner's segment of every bucket (each bucket padded on its own)
        received = FP32 * sum(sizes) // dp
        # packing bucket g, bucket g-1 is in flight (LevelReducer.SEND_BUFFERS = 2)
        send = FP32 * max(a + b for a, b in zip(sizes, [0, *sizes]))
        level = send + received
        if backend == "gloo":  # its scratch, as the CPU tracker sees it: one bucket's at a time
            level += FP32 * max(sizes)
    else:
        received = level = owned.grads  # the packed buffer is reduced in place
    last_fold = 0
    if folding:  # the class stacks, rotated estimate, a fold's transient; at the step both forms
        window, fold = 2 * owned.grads, fold_transient(owned.largest_class)
        stacking, step = 0, 2 * owned.grads
        # the last fold: both estimates' two forms and its transient (the level's received
        # segment is freed once stacked: ShardedSOAP.fold_owned_level)
        last_fold = 4 * owned.grads + fold
    else:  # the class stacks beside the received segment; at the step + their rotation
        window, fold, stacking, step = 0, 0, received + owned.grads, 2 * owned.grads
    return RankMemory(
        params=params_numel * param_bytes,
        grads=params_numel * GRAD_BYTES,
        soap_state=owned.state,
        adam_state=adam_state,
        probe_cache=owned.probe_cache,
        window_buffers=window,
        fold=fold,
        last_fold=last_fold,
        step_buffers=step,
        level_buffers=level,
        refresh=refresh_transient(owned, refresh_wave),
        stacking=stacking,
        folding=folding,
        level_buckets=buckets,
    )
