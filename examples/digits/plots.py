"""PNG plots of a train_digits run folder (matplotlib, Agg backend).

Works on the flat per-step rows that ``train_digits.py`` writes to ``metrics.jsonl``; rerun on
a finished (or running) folder with ``python -m examples.digits.plots runs/demo`` (from the
repository root).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Row = dict[str, Any]
COLORS = {"mlfop": "tab:red", "soap": "tab:blue", "adamw": "tab:gray"}
LEVEL_KEY = re.compile(r"^level(\d+)_(beta|s|ratio|cosine|cosine_after)$")


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a metrics.jsonl file (blank lines skipped)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _value(row: Row, key: str) -> float:
    """Float value of ``key`` (NaN when missing or null)."""
    v = row.get(key)
    return float("nan") if v is None else float(v)


def _series(rows: Sequence[Row], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where ``key`` is finite."""
    pts = [(int(r["step"]), _value(r, key)) for r in rows]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def ema(values: Sequence[float], alpha: float = 0.2) -> list[float]:
    """Exponential moving average (for readable noisy loss curves)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1.0 - alpha) * out[-1])
    return out


def by_optimizer(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """Rows grouped by their ``optimizer`` column, in order of first appearance."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(str(r["optimizer"]), []).append(r)
    return groups


def level_numbers(rows: Iterable[Row]) -> list[int]:
    """Folding levels that have diagnostics columns with at least one finite value."""
    found = set()
    for r in rows:
        for k, v in r.items():
            m = LEVEL_KEY.match(k)
            if m and v is not None and math.isfinite(float(v)):
                found.add(int(m.group(1)))
    return sorted(found)


def _color(name: str) -> str | None:
    """Fixed colour per optimizer so every figure reads the same."""
    return COLORS.get(name)


def _save(fig: Any, path: Path) -> Path:
    """Write the figure as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(rows: Sequence[Row], path: Path) -> Path:
    """Training loss per modality (image, text) vs step, one line per optimizer."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, key, title in zip(axes, ("image_loss", "text_loss"), ("image tokens", "text tokens")):
        for name, group in by_optimizer(rows).items():
            steps, vals = _series(group, key)
            if not steps:
                continue
            ax.plot(steps, vals, color=_color(name), alpha=0.25, lw=0.8)
            ax.plot(steps, ema(vals), color=_color(name), lw=1.8, label=name)
        ax.set_title(f"training loss: {title}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return _save(fig, path)


def plot_cosines(rows: Sequence[Row], path: Path) -> Path:
    """Inter-modality gradient cosine per optimizer, and the folding cosine per level."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    ax = axes[0]
    drew = False
    for name, group in by_optimizer(rows).items():
        steps, vals = _series(group, "modality_cosine")
        if steps:
            ax.plot(steps, vals, "o-", ms=3, color=_color(name), label=name)
            drew = True
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title("cos(grad image loss, grad text loss), decoder matrices")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cosine")
    ax.grid(alpha=0.3)
    _legend_or_note(ax, drew, "inter-modality cosine not measured (--diag-every 0 or PP > 1)")
    _plot_levels(axes[1], rows, "cosine", "folding: cos(z_{j-1}, h_j) per level")
    axes[1].axhline(0.0, color="k", lw=0.6)
    return _save(fig, path)


def plot_betas(rows: Sequence[Row], path: Path) -> Path:
    """FOP beta and the variance ratio ||d||/||a|| per folding level."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    _plot_levels(axes[0], rows, "beta", "FOP beta per level (mean over blocks)")
    axes[0].axhline(0.0, color="k", lw=0.6)
    _plot_levels(axes[1], rows, "ratio", "variance ratio ||d|| / ||a|| per level")
    return _save(fig, path)


def plot_grad_diagnostics(rows: Sequence[Row], path: Path) -> Path:
    """Plot the optimizer's grad-group diagnostics (steps armed every --diag-every).

    Modality cosines, predicted loss change per modality for the plain-mean and the folded
    update, fraction of blocks whose update ascends a modality, and the gradient noise scale.
    """
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    groups = {n: g for n, g in by_optimizer(rows).items() if n != "adamw"}

    def lines(ax: Any, specs: Sequence[tuple[str, str, str]], note: str) -> None:
        drew = False
        for name, group in groups.items():
            for key, style, label in specs:
                steps, vals = _series(group, key)
                if steps:
                    ax.plot(steps, vals, style, ms=3, color=_color(name), label=f"{name} {label}")
                    drew = True
        ax.grid(alpha=0.3)
        ax.set_xlabel("optimizer step")
        _legend_or_note(ax, drew, note)

    by_mod = "needs --micro-batch-layout by-modality"
    ax = axes[0, 0]
    lines(
        ax,
        [("grad_cos_image_text", "o-", "Euclidean"), ("grad_cos_mi_image_text", "s--", "M^-1")],
        by_mod,
    )
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title("cos(g_image, g_text) of the step")
    ax = axes[0, 1]
    lines(
        ax,
        [
            ("grad_pred_plain_image", "o--", "image, plain mean"),
            ("grad_pred_folded_image", "o-", "image, folded"),
            ("grad_pred_plain_text", "s--", "text, plain mean"),
            ("grad_pred_folded_text", "s-", "text, folded"),
            ("grad_pred_plain_all", "^--", "all, plain mean"),
            ("grad_pred_folded_all", "^-", "all, folded"),
        ],
        "no grad diagnostics in this run",
    )
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title("predicted loss change -lr <g_m, M^-1 u>")
    ax = axes[1, 0]
    lines(
        ax,
        [("grad_ascent_plain", "o--", "plain mean"), ("grad_ascent_folded", "o-", "folded")],
        "no grad diagnostics in this run",
    )
    ax.set_title("fraction of blocks whose update ascends a modality")
    ax = axes[1, 1]
    lines(
        ax,
        [("grad_noise_scale", "o-", "B_noise"), ("grad_micro_steps", ":", "K (batch)")],
        "no grad diagnostics in this run",
    )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("gradient noise scale vs batch, in micro-steps")
    return _save(fig, path)


def _plot_levels(ax: Any, rows: Sequence[Row], field: str, title: str) -> None:
    """One line per (optimizer with folding, level) for ``level{j}_{field}``."""
    styles = ("-", "--", ":", "-.")
    drew = False
    for name, group in by_optimizer(rows).items():
        for i, level in enumerate(level_numbers(group)):
            steps, vals = _series(group, f"level{level}_{field}")
            if steps:
                ax.plot(
                    steps,
                    ema(vals, 0.3),
                    styles[i % len(styles)],
                    color=_color(name),
                    label=f"{name} level {level}",
                )
                drew = True
    _legend_or_note(ax, drew, "no folding in this run")
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)


def _legend_or_note(ax: Any, drew: bool, note: str) -> None:
    """A legend when something was drawn, else a centred note saying why the panel is empty."""
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)


def make_plots(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Write loss.png, cosine.png, beta.png and grad.png into ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    return [
        plot_losses(rows, out_dir / "loss.png"),
        plot_cosines(rows, out_dir / "cosine.png"),
        plot_betas(rows, out_dir / "beta.png"),
        plot_grad_diagnostics(rows, out_dir / "grad.png"),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: regenerate the plots of a run folder from its metrics.jsonl."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m examples.digits.plots RUN_DIR")
    run = Path(args[0])
    for p in make_plots(read_jsonl(run / "metrics.jsonl"), run):
        print(p)


if __name__ == "__main__":
    main()
