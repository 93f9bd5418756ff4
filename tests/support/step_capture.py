"""Capture one optimizer step of every SOAP engine, and check it against the dense equations.

``capture_engine_steps`` wraps each engine's ``step`` of an ML-FOP-SOAP Megatron optimizer:
while ``active()`` it records, per owned block, the SOAP state and the block's values before
the step, the folded gradient the step was given (times the clipping factor), and the block's
values after it. ``check_block_step`` recomputes that one step from the SOAP equations
(DESIGN.md section 1) with no package code, so a path that trains nothing, or trains wrongly,
fails here whatever its loss does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from tests.support.reference_soap import scaled_to_rms, signal_mask


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def capture_engine_steps(
    optimizer: Any, active: Callable[[], bool], out: list[dict[str, Any]]
) -> None:
    """Wrap every engine's ``step``; while ``active()``, append one record per engine to out."""
    for engine in (e for o in optimizer.mlfop for e in o.engines):
        original = engine.step

        def step(lr, weight_decay, grad_scale=1.0, _engine=engine, _original=original):
            if not active():
                return _original(lr, weight_decay, grad_scale)
            grads, _ = _engine.window_gradients()
            blocks = [
                {
                    "name": _engine.block_name(o),
                    "state": _copy_state(o.state),
                    "before": o.view(o.param.data).detach().clone(),
                    "grad": g.detach().clone(),
                }
                for o, g in zip(_engine.owned, grads)
            ]
            result = _original(lr, weight_decay, grad_scale)
            for o, b in zip(_engine.owned, blocks):
                b["after"] = o.view(o.param.data).detach().clone()
                b["master_after"] = o.state["master"].clone() if "master" in o.state else None
            out.append(
                {
                    "engine": type(_engine).__name__,
                    "lr": lr,
                    "weight_decay": weight_decay,
                    "grad_scale": grad_scale,
                    "soap": asdict(_engine.config.soap),
                    "folding": asdict(_engine.config.folding),
                    "blocks": blocks,
                }
            )
            return result

        engine.step = step


def reference_block_update(block: dict[str, Any], record: dict[str, Any]) -> torch.Tensor:
    """The block's value after one plain SOAP step (no first step, no basis change before it).

    g' = QL^T G QR; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2; t = t + 1;
    W <- W - lr sqrt(1-b2^t)/(1-b1^t) QL (m / (sqrt(v) + eps)) QR^T (``normalization="sign"``:
    W <- W - lr QL sign(m) QR^T, 0 in a factor's null space); W <- W - lr wd W, on the fp32
    main weights when the block keeps them.
    """
    cfg, st = record["soap"], block["state"]
    b1, b2 = cfg["betas"]
    dtype = st["exp_avg"].dtype
    g = block["grad"].to(dtype) * record["grad_scale"]
    ql = st.get("QL", torch.eye(g.shape[0], dtype=dtype))
    qr = st.get("QR", torch.eye(g.shape[1], dtype=dtype))
    g_rot = ql.T @ g @ qr
    m = b1 * st["exp_avg"] + (1 - b1) * g_rot
    v = b2 * st["exp_avg_sq"] + (1 - b2) * g_rot * g_rot
    t = st["step"] + 1
    size = record["lr"]
    if cfg["correct_bias"]:
        size = record["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
    w = st["master"] if "master" in st else block["before"].to(dtype)
    if cfg.get("normalization", "adam") == "sign":  # W <- W - lr QL (sign(m) * mask) QR^T
        u, size = ql @ (torch.sign(m) * _signal_mask(g, st, cfg)) @ qr.T, record["lr"]
    else:
        u = ql @ (m / (v.sqrt() + cfg["eps"])) @ qr.T
    if cfg.get("update_rms", 0.0) > 0:  # the update's RMS set to update_rms, step size lr
        u, size = scaled_to_rms(u, cfg["update_rms"]), record["lr"]
    w = w - size * u
    return w - record["lr"] * record["weight_decay"] * w


def _signal_mask(g: torch.Tensor, st: dict[str, Any], cfg: dict[str, Any]) -> torch.Tensor:
    """1 off the null spaces of the factors the step's gradient updated (Shampoo's EMA).

    lam = diag(Q^T F' Q) with F' = b F + (1 - b) G G^T (left) or G^T G (right), formed densely;
    a direction is null where lam <= 4 u x max lam (``reference_soap.signal_mask``; every step
    of this capture updates the factors before its moments: the default order).
    """
    beta = cfg["betas"][1] if cfg["shampoo_beta"] is None else cfg["shampoo_beta"]
    lams = [
        torch.diag(st[basis].T @ (beta * st[key] + (1 - beta) * gram) @ st[basis])
        if basis in st
        else None
        for key, basis, gram in (("L", "QL", g @ g.T), ("R", "QR", g.T @ g))
    ]
    return signal_mask(*lams, g.shape[0], g.shape[1], g.dtype)


def plain_step(block: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether the captured step is one ``reference_block_update`` describes."""
    cfg, st = record["soap"], block["state"]
    refresh_before = cfg["refresh_first"] and (st["step"] + 1) % cfg["precondition_frequency"] == 0
    eta = record["folding"]["step_size"] != "none"
    return bool(st["initialized"]) and not refresh_before and not eta


def check_block_step(block: dict[str, Any], record: dict[str, Any], rtol: float) -> float:
    """Assert the block changed and moved as the reference says; returns the relative error.

    The error is |actual update - reference update| / |reference update| (the update, not the
    weights: a step that changes nothing has relative error 1).
    """
    want = reference_block_update(block, record)
    got = block["master_after"] if block["master_after"] is not None else block["after"]
    start = block["state"]["master"] if "master" in block["state"] else block["before"]
    start = start.to(want.dtype)
    delta_want = want - start
    delta_got = got.to(want.dtype) - start
    assert not torch.equal(block["after"], block["before"]), f"{block['name']} did not change"
    err = float((delta_got - delta_want).norm() / delta_want.norm())
    assert err <= rtol, f"{block['name']}: update differs from the reference by {err:.2e}"
    if block["master_after"] is not None:  # the model's weights are the main weights, cast
        cast = block["master_after"].to(block["after"].dtype)
        assert torch.equal(block["after"], cast), f"{block['name']}: param != its main weights"
    return err
