"""Per-group (per-modality) gradient diagnostics of one accumulation window: pure tensors.

The micro-steps of a window are tagged with group ids 0..G-1 (one task per micro-batch, e.g.
image = 0, text = 1). A *segment* is a run of consecutive micro-steps of one group whose
gradient sum is reduced over data-parallel ranks at once (in the Megatron path a level, or a
part of a level cut by an extra sync point; in plain PyTorch every micro-step). Per block:

  g_m = (sum of the segments of group m) / n_m            (group mean gradient, n_m micro-steps)
  u0  = sum_m (n_m / K) g_m                               (the plain window mean, SOAP's input)
  u   = eta* g_comb                                        (the folded gradient; eta* = 1 unless
                                                            step_size="eta_star")

with M the window's fold metric (the previous step's SOAP preconditioner, diagonal D in the
rotated basis: M^-1 x = x / D, or M = I before the first basis). Additive per-block rows
(``DiagLayout``), summed over blocks (and tensor-parallel shards) into window totals:

  euc[i,j] = <g_i, g_j>,  mi[i,j] = <g_i, M^-1 g_j>                (i <= j)
  gu0[m] = <g_m, M^-1 u0>,  gu[m] = <g_m, M^-1 u>
  pred0[m] = -lr <g_m, M^-1 u0>,  pred[m] = -lr <g_m, M^-1 u>      (first-order loss change of
                                                                     group m's loss for a step
                                                                     of lr along -M^-1 u0 / u)
  uu = <u, M^-1 u>,  u0u = <u0, M^-1 u>
  sq = sum_segments ||segment sum||^2 / segment size = sum_s n_s ||x_s||^2 (x_s: segment mean)
  asc0[m] = [gu0[m] < 0], asc[m] = [gu[m] < 0], and their "any m" (a step that ascends group
  m's loss in that block to first order), and a block count.

Summaries (``summarize_grad_diagnostics``): cosines cos(g_i, g_j) in the Euclidean and the M^-1
metric, norms, the predicted loss changes, the fractions of blocks whose update ascends a group,
cos(u0, u) in M^-1, and the gradient noise scale from the segments: a segment mean of s
micro-steps has covariance Sigma/s (Sigma: covariance of one micro-step gradient, itself the
mean over all DP ranks' micro-batches), so E sum_s n_s ||x_s - g_{m(s)}||^2 = (S - G) tr(Sigma)
(one-way ANOVA over the S segments within the G groups; for two equal halves of n micro-steps,
E||d||^2 = 2 tr(Sigma)/n). Then |G|^2 is estimated without bias as ||u0||^2 - tr(Sigma)/K and
the noise scale B_noise = tr(Sigma)/|G|^2 (McCandlish et al. 2018), in micro-steps: a window of
K micro-steps is a "large batch" when K >> B_noise. The inner products run in the rotated basis
(Euclidean norms are rotation invariant). The predicted changes use the window's direction
without momentum and before gradient clipping: they compare u0 and u on equal terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ReduceFn = Callable[[torch.Tensor], torch.Tensor]
RotateFn = Callable[[torch.Tensor], torch.Tensor]


def check_groups(groups: Sequence[int], accumulation_steps: int) -> tuple[int, ...]:
    """Validated group ids, one per micro-step; every id 0..max must occur."""
    out = tuple(groups)
    if len(out) != accumulation_steps:
        raise ValueError(
            f"grad groups need one id per micro-step: got {len(out)} ids for "
            f"accumulation_steps={accumulation_steps}"
        )
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in out):
        raise ValueError(f"grad group ids must be integers >= 0 (got {out})")
    if set(out) != set(range(max(out) + 1)):
        raise ValueError(f"grad group ids must cover 0..{max(out)} without gaps (got {out})")
    return out


def segment_ends(boundaries: Sequence[int], groups: Sequence[int]) -> tuple[int, ...]:
    """Sync points (cumulative micro-step counts) of a diagnostics window.

    The level boundaries, plus every point where the group changes (a segment holds one group),
    plus the middle of a group that would otherwise be a single segment of >= 2 micro-steps (the
    noise scale needs two segments in a group). Sorted, ending at K.
    """
    k = len(groups)
    ends = set(boundaries) | {i for i in range(1, k) if groups[i] != groups[i - 1]}
    ordered = sorted(ends)
    starts = [0, *ordered[:-1]]
    for m in set(groups):
        mine = [(s, e) for s, e in zip(starts, ordered) if groups[s] == m]
        if len(mine) == 1 and mine[0][1] - mine[0][0] >= 2:
            s, e = mine[0]
            ends.add(s + (e - s) // 2)
    return tuple(sorted(ends))


@dataclass(frozen=True)
class DiagLayout:
    """Column indices of the per-block diagnostic rows for G groups."""

    num_groups: int

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """Group pairs (i, j), i <= j, in column order."""
        g = self.num_groups
        return [(i, j) for i in range(g) for j in range(i, g)]

    def _pair(self, i: int, j: int) -> int:
        i, j = min(i, j), max(i, j)
        return self.pairs.index((i, j))

    def euc(self, i: int, j: int) -> int:
        """Column of <g_i, g_j>."""
        return self._pair(i, j)

    def mi(self, i: int, j: int) -> int:
        """Column of <g_i, M^-1 g_j>."""
        return len(self.pairs) + self._pair(i, j)

    def gu0(self, m: int) -> int:
        """Column of <g_m, M^-1 u0>."""
        return 2 * len(self.pairs) + m

    def gu(self, m: int) -> int:
        """Column of <g_m, M^-1 u>."""
        return 2 * len(self.pairs) + self.num_groups + m

    def pred0(self, m: int) -> int:
        """Column of -lr <g_m, M^-1 u0>."""
        return 2 * len(self.pairs) + 2 * self.num_groups + m

    def pred(self, m: int) -> int:
        """Column of -lr <g_m, M^-1 u>."""
        return 2 * len(self.pairs) + 3 * self.num_groups + m

    @property
    def uu(self) -> int:
        """Column of <u, M^-1 u>."""
        return 2 * len(self.pairs) + 4 * self.num_groups

    @property
    def u0u(self) -> int:
        """Column of <u0, M^-1 u>."""
        return self.uu + 1

    @property
    def sq(self) -> int:
        """Column of the segments' sum of squares (``GroupSums.sq``)."""
        return self.uu + 2

    @property
    def linear_width(self) -> int:
        """Columns that are sums of inner products (summed over tensor-parallel shards)."""
        return self.uu + 3

    def asc0(self, m: int) -> int:
        """Column of the flag gu0[m] < 0."""
        return self.linear_width + m

    def asc(self, m: int) -> int:
        """Column of the flag gu[m] < 0."""
        return self.linear_width + self.num_groups + m

    @property
    def asc0_any(self) -> int:
        """Column of the flag: gu0[m] < 0 for some m."""
        return self.linear_width + 2 * self.num_groups

    @property
    def asc_any(self) -> int:
        """Column of the flag: gu[m] < 0 for some m."""
        return self.asc0_any + 1

    @property
    def blocks(self) -> int:
        """Column of the block count (1 per row)."""
        return self.asc0_any + 2

    @property
    def width(self) -> int:
        """Number of columns."""
        return self.blocks + 1


@dataclass
class GroupSums:
    """Per-group gradient sums of one window over a list of blocks (original coordinates).

    ``groups``: the group id of every micro-step (``check_groups``). Segments are added in
    order; each must hold micro-steps of one group. Per block one [G, *shape] buffer.
    """

    groups: tuple[int, ...]
    num_blocks: int
    sums: list[torch.Tensor] | None = None  # per block [G, *shape]: sums over micro-steps
    sq: list[torch.Tensor] | None = None  # per block: sum_s ||segment sum||^2 / size
    segments: int = 0
    micro_steps: int = 0

    def __post_init__(self) -> None:
        self.groups = check_groups(self.groups, len(self.groups))

    @property
    def num_groups(self) -> int:
        """Number of groups G."""
        return max(self.groups) + 1

    @property
    def counts(self) -> list[int]:
        """Micro-steps per group."""
        return [self.groups.count(m) for m in range(self.num_groups)]

    @property
    def complete(self) -> bool:
        """Whether every micro-step of the window was added."""
        return self.micro_steps == len(self.groups)

    def add_segment(
        self, start: int, size: int, grads: Sequence[torch.Tensor], weight: float = 1.0
    ) -> None:
        """Micro-steps start..start+size-1 (0-based), whose gradient sum is weight * grads."""
        if start != self.micro_steps or size < 1 or start + size > len(self.groups):
            raise ValueError(
                f"segment {start}..{start + size - 1} does not continue the window at micro-step "
                f"{self.micro_steps} of {len(self.groups)}"
            )
        ids = set(self.groups[start : start + size])
        if len(ids) != 1:
            raise ValueError(f"segment {start}..{start + size - 1} mixes grad groups {ids}")
        if len(grads) != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} gradients, got {len(grads)}")
        (group,) = ids
        self.micro_steps += size
        self.segments += 1
        if self.sums is None:
            self.sums = [g.new_zeros((self.num_groups, *g.shape)) for g in grads]
        for acc, g in zip(self.sums, grads):
            acc[group].add_(g, alpha=weight)
        norms = [torch.dot(g.reshape(-1), g.reshape(-1)) * (weight * weight / size) for g in grads]
        self.sq = norms if self.sq is None else [a + b for a, b in zip(self.sq, norms)]

    def means(self) -> list[torch.Tensor]:
        """Group mean gradients per block, [G, *shape] (sums over the groups' micro-steps)."""
        if not self.complete:
            raise ValueError(
                f"grad groups cover {self.micro_steps} of {len(self.groups)} micro-steps"
            )
        out = []
        for acc in self.sums or ():
            n = torch.tensor(self.counts, dtype=acc.dtype, device=acc.device)
            out.append(acc / n.view(-1, *([1] * (acc.dim() - 1))))
        return out


def block_rows(
    means_rot: Sequence[torch.Tensor],
    counts: Sequence[int],
    diags: Sequence[torch.Tensor | None],
    comb_rot: Sequence[torch.Tensor | None] | None,
    eta: torch.Tensor | None,
    lrs: Sequence[float],
    sq: Sequence[torch.Tensor],
    reduce_fn: ReduceFn | None = None,
) -> torch.Tensor:
    """Per-block diagnostic rows [num_blocks, DiagLayout(G).width].

    float64, on the blocks' device, no host sync.

    ``means_rot[b]``: the rotated mean gradients of the G groups in block b, [G, *shape];
    ``counts[m]``: group m's micro-steps; ``diags[b]``: metric diagonal (None: M = I);
    ``comb_rot[b]``: rotated folded gradient (None, or ``comb_rot`` None: no fold, u = u0);
    ``eta``: eta* per block or None; ``lrs[b]``: the step's learning rate of block b;
    ``sq[b]``: ``GroupSums.sq``. Per block two Gram matrices of [g_0..g_{G-1}, u0, u] (one
    Euclidean, one in M^-1) give every inner product. ``reduce_fn`` sums them over
    tensor-parallel shards before the signs are taken.
    """
    num_groups = len(counts)
    layout = DiagLayout(num_groups)
    n = len(diags)
    if n == 0:
        return torch.zeros(0, layout.width, dtype=torch.float64)
    k = float(sum(counts))
    iu = [i for i, _ in layout.pairs]
    ju = [j for _, j in layout.pairs]
    g = num_groups
    core, tails = [], []
    for b in range(n):
        x = means_rot[b].reshape(g, -1)
        u0 = torch.tensor([c / k for c in counts], dtype=x.dtype, device=x.device) @ x
        comb = None if comb_rot is None else comb_rot[b]
        u = u0 if comb is None else comb.reshape(-1)
        if eta is not None:
            u = u * eta[b].to(u.dtype)
        stacked = torch.cat([x, u0[None], u[None]])  # [G+2, numel]
        d = diags[b]
        mi = stacked if d is None else stacked / d.reshape(1, -1)
        euc = x @ x.T
        gram = stacked @ mi.T  # gram[i, j] = <X_i, M^-1 X_j>
        core.append(
            torch.cat([euc[iu, ju], gram[iu, ju], gram[:g, g], gram[:g, g + 1]]).to(torch.float64)
        )
        tails.append(
            torch.stack([gram[g + 1, g + 1], gram[g, g + 1], sq[b].to(x.dtype)]).to(torch.float64)
        )
    core_t = torch.stack(core)
    lr = torch.tensor(list(lrs), dtype=torch.float64, device=core_t.device)[:, None]
    gu = core_t[:, layout.gu0(0) : layout.gu0(0) + 2 * g]  # gu0 then gu
    lin = torch.cat([core_t, -lr * gu, torch.stack(tails)], dim=1)
    if reduce_fn is not None:
        lin = reduce_fn(lin)
    asc0 = lin[:, layout.gu0(0) : layout.gu0(0) + g] < 0
    asc = lin[:, layout.gu(0) : layout.gu(0) + g] < 0
    flags = torch.cat(
        [asc0, asc, asc0.any(dim=1, keepdim=True), asc.any(dim=1, keepdim=True)], dim=1
    ).to(torch.float64)
    ones = torch.ones(n, 1, dtype=torch.float64, device=lin.device)
    return torch.cat([lin, flags, ones], dim=1)


def group_block_rows(
    sums: GroupSums,
    rotate_fns: Sequence[RotateFn],
    diags: Sequence[torch.Tensor | None],
    comb_rot: Sequence[torch.Tensor | None] | None,
    eta: torch.Tensor | None,
    lrs: Sequence[float],
    reduce_fn: ReduceFn | None = None,
) -> torch.Tensor:
    """``block_rows`` from a complete window's ``GroupSums``.

    Per block one batched rotation of its [G, rows, cols] group means (rot(X) = QL^T X QR
    broadcasts over the group axis).
    """
    rotated = [rot(m) for rot, m in zip(rotate_fns, sums.means())]
    return block_rows(rotated, sums.counts, diags, comb_rot, eta, lrs, sums.sq or [], reduce_fn)


def summarize_grad_diagnostics(
    totals: torch.Tensor | Sequence[float], counts: Sequence[int], segments: int
) -> dict[str, float]:
    """Window summaries from the block-summed rows (host floats; see the module docstring).

    Keys (groups m, pairs i < j): norm_g{m}, norm_mi_g{m}, cos_g{i}_g{j}, cos_mi_g{i}_g{j},
    pred_plain_g{m}, pred_folded_g{m} (predicted loss change: -lr <g_m, M^-1 u>),
    ascent_plain_g{m}, ascent_folded_g{m}, ascent_plain_any, ascent_folded_any (fractions of
    blocks), cos_mi_plain_folded, noise_trace (tr Sigma of one micro-step), grad_sq (unbiased
    |G|^2), noise_scale (B_noise in micro-steps), micro_steps (K), segments, blocks.
    """
    t = [float(x) for x in (totals.tolist() if torch.is_tensor(totals) else totals)]
    num_groups = len(counts)
    layout = DiagLayout(num_groups)
    blocks = t[layout.blocks]
    k = float(sum(counts))
    w = [c / k for c in counts]
    nan = float("nan")

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else nan

    def cos(num: float, a: float, b: float) -> float:
        return ratio(num, math.sqrt(max(a * b, 0.0)))

    out: dict[str, float] = {"micro_steps": k, "segments": float(segments), "blocks": blocks}
    for m in range(num_groups):
        out[f"norm_g{m}"] = math.sqrt(max(t[layout.euc(m, m)], 0.0))
        out[f"norm_mi_g{m}"] = math.sqrt(max(t[layout.mi(m, m)], 0.0))
    for i, j in layout.pairs:
        if i < j:
            ii, jj = layout.euc(i, i), layout.euc(j, j)
            out[f"cos_g{i}_g{j}"] = cos(t[layout.euc(i, j)], t[ii], t[jj])
            out[f"cos_mi_g{i}_g{j}"] = cos(
                t[layout.mi(i, j)], t[layout.mi(i, i)], t[layout.mi(j, j)]
            )
    for m in range(num_groups):
        out[f"pred_plain_g{m}"] = t[layout.pred0(m)]
        out[f"pred_folded_g{m}"] = t[layout.pred(m)]
        out[f"ascent_plain_g{m}"] = ratio(t[layout.asc0(m)], blocks)
        out[f"ascent_folded_g{m}"] = ratio(t[layout.asc(m)], blocks)
    out["ascent_plain_any"] = ratio(t[layout.asc0_any], blocks)
    out["ascent_folded_any"] = ratio(t[layout.asc_any], blocks)
    u0u0 = sum(
        w[i] * w[j] * t[layout.mi(i, j)] for i in range(num_groups) for j in range(num_groups)
    )
    out["cos_mi_plain_folded"] = cos(t[layout.u0u], u0u0, t[layout.uu])
    u0_sq = sum(
        w[i] * w[j] * t[layout.euc(i, j)] for i in range(num_groups) for j in range(num_groups)
    )
    within = t[layout.sq] - sum(c * t[layout.euc(m, m)] for m, c in enumerate(counts))
    dof = segments - num_groups
    trace = max(within, 0.0) / dof if dof > 0 else nan
    grad_sq = u0_sq - trace / k
    out["noise_trace"] = trace
    out["grad_sq"] = grad_sq
    out["noise_scale"] = trace / grad_sq if grad_sq > 0 else (math.inf if trace > 0 else nan)
    return out
