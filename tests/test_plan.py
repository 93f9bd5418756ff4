"""Tests of the ``mlfop-plan`` job planner (pure Python, no torch needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mlfop_megatron.config import FoldingConfig
from mlfop_megatron.distributed.assignment import (
    Assignment,
    BlockingConfig,
    CostModel,
    ParamSpec,
    choose_block_size,
    make_blocks,
    pingpong_assignment,
)
from mlfop_megatron.distributed.comm_model import communication_table, format_table
from mlfop_megatron.distributed.model_shapes import LLAMA3_8B, llama3_8b_shapes
from mlfop_megatron.launch.plan.cli import main
from mlfop_megatron.launch.plan.model import PlanConfig, make_plan, split_stages
from mlfop_megatron.launch.plan.report import format_bytes, format_flops

REPO = Path(__file__).resolve().parents[1]
# Folding is off by default (one level); these plans are of folding runs (L levels).
LLAMA_ARGS = "--model llama3-8b --dp 64 --tp 8 --pp 2 --micro-batches 8 --folding".split()
TINY_PLAIN = (
    "--hidden 64 --ffn 128 --layers 4 --heads 4 --kv-heads 2 --vocab 1000 "
    "--dp 4 --tp 2 --pp 2 --micro-batches 8"
).split()
TINY = [*TINY_PLAIN, "--folding"]

EXPECTED_KEYS = {
    "inputs",
    "world_size",
    "owner_ranks",
    "levels",
    "boundaries",
    "block_size",
    "block_size_source",
    "target_balance_met",
    "busiest_stage",
    "busiest",
    "stages",
    "notes",
    "communication",
}
STAGE_KEYS = {
    "soap_state_max_bytes",
    "soap_state_mean_bytes",
    "soap_state_total_bytes",
    "adam_state_bytes",
    "fold_buffer_max_bytes",
    "memory_max_bytes",
    "compute_max_gflop",
    "compute_balance",
    "pingpong_balance",
    "grad_buffer_bytes",
    "level_reduce_bytes_per_step",
    "adam_sync_bytes_per_step",
    "param_gather_bytes_per_step",
    "launches_per_step",
    "tp_gather_bytes_per_step",
    "comm_bytes_per_step",
}


def _run(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[str, dict]:
    """Run main with --json; return (stdout, parsed json)."""
    out_json = tmp_path / "plan.json"
    assert main([*args, "--json", str(out_json)]) == 0
    return capsys.readouterr().out, json.loads(out_json.read_text())


def _stage_matrices(specs: list[ParamSpec], first: int, last: int) -> list[ParamSpec]:
    """SOAP matrices of decoder layers first..last (inclusive), in Megatron order."""
    layer = [s for s in specs if s.name.startswith("decoder.layers.")]
    return [
        s
        for s in layer
        if s.preconditioned and first <= int(s.name.split(".")[2]) <= last and len(s.shape) == 2
    ]


# ---- llama3-8b at DP=64, TP=8, PP=2, K=8 -------------------------------------------------


def test_llama3_8b_matches_assignment(tmp_path, capsys):
    out, plan = _run(LLAMA_ARGS, tmp_path, capsys)
    assert set(plan) == EXPECTED_KEYS
    assert STAGE_KEYS <= set(plan["busiest"])
    assert plan["world_size"] == 1024 and plan["owner_ranks"] == 64
    assert plan["levels"] == 4 and plan["boundaries"] == [1, 2, 4, 8]
    assert len(plan["stages"]) == 2

    specs = llama3_8b_shapes(8)
    cost = CostModel()
    total_soap = 0
    for stage, (first, last) in zip(plan["stages"], ((0, 15), (16, 31))):
        mats = _stage_matrices(specs, first, last)
        asg = Assignment.build(make_blocks(mats, BlockingConfig()), 64, cost)
        # SOAP state: max/mean over DP ranks, and the sum over DP ranks is the stage total.
        assert stage["soap_state_max_bytes"] == max(asg.memory_loads)
        assert stage["soap_state_mean_bytes"] == pytest.approx(sum(asg.memory_loads) / 64)
        direct_total = sum(cost.memory_bytes(b) for b in asg.blocks)
        assert stage["soap_state_total_bytes"] == direct_total
        assert stage["soap_state_mean_bytes"] * 64 == pytest.approx(direct_total)
        total_soap += direct_total
        assert stage["compute_balance"] == pytest.approx(asg.compute_balance)
        assert stage["compute_max_gflop"] == pytest.approx(max(asg.compute_loads) / 1e9)
        # Owner-ordered buffer: 64 segments of the most loaded owner's elements, ring r = 63/64.
        buffer = 64 * max(asg.numel_loads)
        assert stage["param_gather_bytes_per_step"] == pytest.approx(2 * 63 / 64 * buffer)
        assert stage["level_reduce_bytes_per_step"] == pytest.approx(4 * 4 * 63 / 64 * buffer)
        # L level reductions in auto buckets (fp32 runs of every owner's segment of at most
        # 1 GiB and half a segment, at least 16 MiB, at most 32; one bucket where that would
        # be 2 or fewer: no saving) + 4
        budget = max(16 << 20, min(1 << 30, 4 * max(asg.numel_loads) // 2))
        asked = min(32, -(-4 * buffer // budget))
        assert stage["launches_per_step"] == 4 * (asked if asked > 2 else 1) + 4
        pp = pingpong_assignment(mats, 64, cost)
        assert stage["pingpong_balance"] == pytest.approx(pp.compute_balance)
        assert stage["fold_buffer_max_bytes"] == 2 * max(asg.numel_loads) * 4
    # Summed over both stages: every SOAP matrix of the model, counted once.
    all_mats = [s for s in specs if s.preconditioned]
    whole = make_blocks(all_mats, BlockingConfig())
    assert total_soap == sum(cost.memory_bytes(b) for b in whole)

    busiest = plan["stages"][plan["busiest_stage"]]
    assert busiest == plan["busiest"]
    assert busiest["memory_max_bytes"] == max(s["memory_max_bytes"] for s in plan["stages"])
    # Printed numbers are the same numbers.
    assert f"balance max/mean {busiest['compute_balance']:.3f}" in out
    assert f"balance {busiest['pingpong_balance']:.3f}" in out
    assert format_bytes(busiest["soap_state_total_bytes"]) in out
    assert format_bytes(busiest["soap_state_max_bytes"]) in out
    assert format_flops(busiest["compute_max_gflop"]) in out
    assert format_bytes(busiest["level_reduce_bytes_per_step"]) in out
    assert format_bytes(busiest["adam_sync_bytes_per_step"]) in out
    assert "NOT included" in out


def test_llama3_8b_stage_split_and_comm(tmp_path, capsys):
    _, plan = _run(LLAMA_ARGS, tmp_path, capsys)
    first, last = plan["stages"]
    assert first["has_embedding"] and not first["has_output_layer"]
    assert last["has_output_layer"] and not last["has_embedding"]
    specs = llama3_8b_shapes(8)
    by_stage = split_stages(specs, LLAMA3_8B.layers, 2)
    assert sum(len(s) for s in by_stage) == len(specs)
    for stage, params in zip(plan["stages"], by_stage):
        numel = sum(p.numel for p in params)
        assert stage["params_per_rank"] == numel
        assert stage["grad_buffer_bytes"] == 4 * numel
        adam = sum(p.numel for p in params if not p.preconditioned)
        shard = math.ceil(adam / 64)  # ZeRO-1: this rank's slice of the padded buffer
        assert stage["adam_state_bytes"] == 2 * shard * 4
        # fp32 grads reduce-scattered once into the slices (r x 4 B of the padded buffer) +
        # bf16 params all-gathered (r x 2 B)
        expected = 63 / 64 * 4 * 64 * shard + 63 / 64 * 2 * 64 * shard
        assert stage["adam_sync_bytes_per_step"] == pytest.approx(expected)
        assert stage["tp_gather_bytes_per_step"] == 0  # blockwise: no TP communication
    assert plan["stages"][0]["params_per_rank"] + plan["stages"][1]["params_per_rank"] == sum(
        p.numel for p in specs
    )


def test_auto_block_size_uses_choose_block_size(tmp_path, capsys):
    out, plan = _run([*LLAMA_ARGS, "--auto-block-size"], tmp_path, capsys)
    mats = _stage_matrices(llama3_8b_shapes(8), 16, 31)
    bs, asg = choose_block_size(mats, 64, target_balance=1.05)
    assert plan["block_size"] == bs and plan["block_size_source"] == "auto"
    assert plan["busiest"]["compute_balance"] == pytest.approx(asg.compute_balance)
    assert plan["target_balance_met"] is (asg.compute_balance <= 1.05)
    assert plan["busiest"]["speedup_vs_pingpong"] > 1.0
    assert f"block size {bs} (auto" in out


@pytest.mark.parametrize("balance", ["memory", "both"])
def test_auto_block_size_can_balance_state_memory(tmp_path, capsys, balance):
    args = [*LLAMA_ARGS, "--auto-block-size", "--balance", balance]
    _, plan = _run(args, tmp_path, capsys)
    mats = _stage_matrices(llama3_8b_shapes(8), 16, 31)
    bs, asg = choose_block_size(mats, 64, target_balance=1.05, balance=balance)
    assert plan["block_size"] == bs and plan["block_size_source"] == "auto"
    assert plan["target_balance_met"] is (asg.balance(balance) <= 1.05)


def test_balance_flag_refuses_unknown_metric(capsys):
    assert main([*LLAMA_ARGS, "--auto-block-size", "--balance", "bytes"]) == 2
    assert "--balance: invalid choice: 'bytes'" in capsys.readouterr().err


# ---- tiny hand-checked model -----------------------------------------------------------


# Per TP rank (tp=2) SOAP matrices of one tiny layer.
TINY_LAYER_MATRICES = [("qkv", (64, 64)), ("proj", (64, 32)), ("fc1", (128, 64)), ("fc2", (64, 64))]


def test_tiny_model_hand_checked(tmp_path, capsys):
    out, plan = _run(TINY, tmp_path, capsys)
    # K = 8 -> dyadic boundaries 1, 2, 4, 8 -> 4 levels, 4 all-reduces per step.
    assert plan["levels"] == 4 and plan["boundaries"] == [1, 2, 4, 8]
    # Per TP rank (tp=2): head_dim 16, q rows 32, kv rows 16 -> qkv (64, 64); proj (64, 32);
    # gated fc1 (128, 64); fc2 (64, 64); two norms of 64 -> 18560 params per layer.
    layer = 64 * 64 + 64 * 32 + 128 * 64 + 64 * 64 + 2 * 64
    assert layer == 18560
    # Vocab 1000 padded to a multiple of 128 * 2 = 256 -> 1024; 512 rows per TP rank.
    emb = 512 * 64
    stage0 = 2 * layer + emb
    stage1 = 2 * layer + 64 + emb  # final norm + output layer
    assert [s["params_per_rank"] for s in plan["stages"]] == [stage0, stage1] == [69888, 69952]
    b = plan["busiest"]
    assert plan["busiest_stage"] == 1
    assert b["grad_buffer_bytes"] == 4 * stage1 == 279808
    # Adam: 2 norms of 64 per layer, final norm 64, output layer 512 x 64 per TP rank.
    adam = 2 * 128 + 64 + emb
    assert adam == 33088 and math.ceil(adam / 4) == 8272  # ZeRO-1 slice over DP=4
    assert b["adam_state_bytes"] == 2 * 8272 * 4 == 66176
    # grads reduce-scattered once: 3/4 x 4 B, params all-gathered: 3/4 x 2 B, of 4 slices
    assert b["adam_sync_bytes_per_step"] == pytest.approx(3 * 4 * 8272 + 1.5 * 4 * 8272)
    # The stage's SOAP matrices (2 layers, whole params) owned over DP=4: every level
    # reduce-scatters the owner-ordered fp32 buffer of 4 segments of the most loaded owner.
    mats = [ParamSpec(f"{i}.{n}", sh) for i in range(2) for n, sh in TINY_LAYER_MATRICES]
    asg = Assignment.build(make_blocks(mats), 4)
    buffer = 4 * max(asg.numel_loads)
    assert b["level_reduce_bytes_per_step"] == pytest.approx(4 * 4 * 0.75 * buffer)
    assert b["param_gather_bytes_per_step"] == pytest.approx(2 * 0.75 * buffer)
    assert b["comm_bytes_per_step"] == pytest.approx(
        b["level_reduce_bytes_per_step"]
        + b["adam_sync_bytes_per_step"]
        + b["param_gather_bytes_per_step"]
        + 2 * 0.75 * 16  # ring all-reduce of the fp64 [norm^2, found-inf]
    )
    assert format_bytes(b["level_reduce_bytes_per_step"]) in out
    assert "4 level(s) (boundaries 1 2 4 8)" in out


def test_tiny_model_full_mode(tmp_path, capsys):
    _, plan = _run([*TINY, "--tp-mode", "full"], tmp_path, capsys)
    b = plan["busiest"]
    assert plan["owner_ranks"] == b["owner_ranks"] == 8  # TP x DP
    shard = 2 * (64 * 64 + 64 * 32 + 128 * 64 + 64 * 64)  # two layers of SOAP matrices
    assert b["soap_params_per_rank"] == shard
    # All-gather over TP=2 of each level's shard gradients (fp32): 4 levels x (2-1) x shard.
    assert b["tp_gather_bytes_per_step"] == 4 * 1 * shard * 4
    assert b["tp_full_buffer_bytes"] == 2 * (2 * shard) * 4
    full = [
        ParamSpec("qkv", (128, 64)),
        ParamSpec("proj", (64, 64)),
        ParamSpec("fc1", (256, 64)),
        ParamSpec("fc2", (64, 128)),
    ] * 2
    full = [ParamSpec(f"{i}.{p.name}", p.shape) for i, p in enumerate(full)]
    asg = Assignment.build(make_blocks(full), 8)
    assert b["soap_state_total_bytes"] == sum(asg.memory_loads)
    assert b["compute_balance"] == pytest.approx(asg.compute_balance)


def test_no_folding_one_reduce_scatter(tmp_path, capsys):
    """Without --folding (the default) one level; --no-folding (older lines) says the same."""
    _, folded = _run(TINY, tmp_path, capsys)
    out, plan = _run(TINY_PLAIN, tmp_path, capsys)
    assert plan["levels"] == 1
    assert "1 level(s) (boundaries 8; folding off: --folding)" in out
    b, f = plan["busiest"], folded["busiest"]
    assert b["launches_per_step"] == 1 + 4 and f["launches_per_step"] == 4 + 4
    assert b["level_reduce_bytes_per_step"] == pytest.approx(f["level_reduce_bytes_per_step"] / 4)
    _, alias = _run([*TINY, "--no-folding"], tmp_path, capsys)  # the last switch wins
    assert alias == plan
    assert main([*TINY_PLAIN, "--boundaries", "1", "8"]) == 2
    assert "--boundaries needs --folding" in capsys.readouterr().err


def test_level_buckets_meet_the_issue_21_target_at_8b(tmp_path, capsys):
    """Llama-3-8B, TP=1, DP=8, bf16: one level send buffer is over the target, auto is not."""
    args = "--model llama3-8b --dp 8 --tp 1 --pp 1 --micro-batches 8 --param-bytes 2".split()
    out_one, one = _run([*args, "--level-buckets", "1"], tmp_path, capsys)
    out_auto, auto = _run(args, tmp_path, capsys)
    m1, ma = one["busiest"]["peak_memory"], auto["busiest"]["peak_memory"]
    gib = float(1 << 30)
    # one bucket: N seg send + seg received = 9 x 3.25 GiB
    assert m1["level_buckets"] == 1 and m1["level_buffers"] == 9 * 3.25 * gib
    # auto (1 GiB per send buffer): the 26 GiB buffer in 26 equal runs of every owner's
    # segment (cut inside matrices: each owner holds 16); two send buffers alive + seg
    assert ma["level_buckets"] == 26 and ma["level_buffers"] == (2 + 3.25) * gib
    assert "OVER the DESIGN budget" in out_one and "within the DESIGN budget" in out_auto
    assert "in 26 buckets, 2 send buffers + receive" in out_auto
    assert "transient peak (step)" in out_auto
    b1, ba = one["busiest"], auto["busiest"]
    assert ba["launches_per_step"] == b1["launches_per_step"] + 25  # 26 launches, not 1
    assert ba["comm_bytes_per_step"] == b1["comm_bytes_per_step"]  # no padding added
    rows = {c["layout"]: c for c in auto["communication"]}
    assert rows["mlfop"]["launches"] == ba["launches_per_step"]


def test_refresh_waves_bound_the_step_at_8b(tmp_path, capsys):
    """--refresh-wave 0 (every new basis at once) puts the step's refresh back at B + 4 b_max."""
    args = "--model llama3-8b --dp 8 --tp 1 --pp 1 --micro-batches 8 --param-bytes 2".split()
    _, waves = _run(args, tmp_path, capsys)
    _, one = _run([*args, "--refresh-wave", "0"], tmp_path, capsys)
    mw, m1 = waves["busiest"]["peak_memory"], one["busiest"]["peak_memory"]
    gib = float(1 << 30)
    # one wave: 10.56 GiB of step transient at this layout (2 S = 6.5 GiB + refresh); in waves
    # the refresh is at most one largest class stack or one block's three n^2 stacks
    assert m1["refresh"] > 2 * mw["refresh"]
    assert m1["step_buffers"] == mw["step_buffers"] == 6.5 * gib
    assert m1["refresh"] + m1["step_buffers"] == pytest.approx(10.56 * gib, rel=0.01)
    assert main([*args, "--refresh-wave", "-1"]) == 2
    assert "--refresh-wave" in capsys.readouterr().err


def test_no_folding_counts_no_fold_buffers(tmp_path, capsys):
    """Without --folding no fold buffer, fold workspace or estimate is counted or printed."""
    # one level bucket: the level reduction is the peak (auto: test_level_buckets_meet_target)
    args = "--model llama3-8b --dp 8 --micro-batches 8 --level-buckets 1".split()
    out_on, on = _run([*args, "--folding"], tmp_path, capsys)
    out, off = _run(args, tmp_path, capsys)
    b, f = off["busiest"], on["busiest"]
    assert b["fold_buffer_max_bytes"] == b["fold_buffer_mean_bytes"] == 0
    assert b["memory_max_bytes"] == b["soap_state_max_bytes"] + b["adam_state_bytes"]
    assert f["fold_buffer_max_bytes"] == 2 * 4 * (f["soap_params_per_rank"] // 8)
    assert f["memory_max_bytes"] == b["memory_max_bytes"] + f["fold_buffer_max_bytes"]
    peak, peak_on = b["peak_memory"], f["peak_memory"]
    assert not peak["folding"] and peak_on["folding"]
    assert peak["window_buffers"] == 0 and peak_on["window_buffers"] > 0
    assert peak["stacking"] > 0 and peak_on["stacking"] == 0
    # The same one-level reduction buffers and refresh, folding on or off; at the step no
    # SOAP metric either way (2 S: class stacks + rotation, or the estimate's two forms; the
    # fold chains make the metric from v).
    for key in ("level_buffers", "refresh", "soap_state", "grads", "step_buffers"):
        assert peak[key] == peak_on[key], key
    assert "SOAP metric" not in out
    fold_rows = ("rotated estimate while the window folds", "folded estimate", "eager chains")
    assert not any(row in out for row in fold_rows)
    assert all(row in out_on for row in fold_rows)
    assert "fold buffers (folding off: none)" in out
    assert "fold workspace (folding off: none)" in out
    assert "transient peak (level reduction)" in out and "transient peak (fwd/bwd)" in out_on
    # --folding at K = 1: one level, nothing to fold: the same memory as folding off.
    _, k1 = _run(["--model", "llama3-8b", "--dp", "8", "--folding"], tmp_path, capsys)
    assert k1["busiest"]["fold_buffer_max_bytes"] == 0
    assert not k1["busiest"]["peak_memory"]["folding"]


@pytest.mark.parametrize("k,dp", [(8, 64), (32, 256)])
def test_printed_communication_table_is_comm_models(tmp_path, capsys, k, dp):
    """mlfop-plan prints comm_model's table for the model/layout, number for number."""
    args = f"--model llama3-8b --dp {dp} --micro-batches {k} --block-size 1024 --folding".split()
    out, plan = _run(args, tmp_path, capsys)
    levels = k.bit_length()  # dyadic boundaries 1, 2, ..., K
    rows = communication_table("llama3-8b", (dp,), levels=levels, block_size=1024)
    assert format_table(rows) in out
    assert plan["communication"] == [asdict(r) for r in rows]
    layouts = [r.layout for r in rows]
    assert layouts == [
        "mlfop",
        "mlfop_bf16_wire",
        "mlfop_exact",
        "mlfop_v1",
        "distopt",
        "layerwise",
        "layerwise_pingpong",
    ]
    mlfop = rows[0]
    # L level reductions of G buckets each (auto: the 8B model's fp32 buffer is ~28 GiB)
    buckets = plan["busiest"]["peak_memory"]["level_buckets"]
    assert buckets > 20
    assert mlfop.launches == plan["busiest"]["launches_per_step"] == levels * buckets + 4


def test_world_size_gives_dp(tmp_path, capsys):
    _, plan = _run(
        ["--model", "llama3-8b", "--world-size", "1024", "--tp", "8", "--pp", "2"],
        tmp_path,
        capsys,
    )
    assert plan["inputs"]["dp"] == 64 and plan["world_size"] == 1024


# ---- input validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--model", "llama3-8b", "--dp", "4", "--tp", "3"], "--tp"),
        (["--model", "llama3-8b", "--dp", "4", "--pp", "3"], "--pp"),
        (["--model", "llama3-8b", "--dp", "0"], "--dp"),
        (["--model", "llama3-8b", "--dp", "4", "--micro-batches", "0"], "--micro-batches"),
        (["--model", "llama3-8b", "--dp", "4", "--tp", "2", "--world-size", "4"], "--world-size"),
        (["--model", "llama3-8b", "--dp", "4", "--block-size", "0"], "--block-size"),
        (["--hidden", "64", "--dp", "4"], "--ffn"),
        (["--model", "llama3-8b", "--dp", "4", "--tp-mode", "both"], "--tp-mode"),
        (["--model", "llama3-8b"], "--dp"),
    ],
)
def test_bad_inputs_exit_2(args, option, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "mlfop-plan: error:" in captured.err and option in captured.err


def test_bad_layers_message_names_both_options(capsys):
    assert main(["--model", "llama3-8b", "--dp", "4", "--pp", "3"]) == 2
    assert "--layers (32) must be divisible by --pp (3)" in capsys.readouterr().err


def test_plan_config_raises_value_error():
    with pytest.raises(ValueError, match="--tp"):
        PlanConfig(LLAMA3_8B, dp=4, tp=3)
    with pytest.raises(ValueError, match="--layers"):
        PlanConfig(LLAMA3_8B, dp=4, pp=5)
    with pytest.raises(ValueError, match="--dp"):
        PlanConfig(LLAMA3_8B, dp=0)
    with pytest.raises(ValueError, match="--micro-batches"):
        PlanConfig(LLAMA3_8B, dp=1, micro_batches=0)
    cfg = PlanConfig(LLAMA3_8B, dp=2, tp=8, pp=4, micro_batches=6)
    assert make_plan(cfg).boundaries == (6,)  # folding off by default: one level
    folding = FoldingConfig(enabled=True, accumulation_steps=6)
    cfg = PlanConfig(LLAMA3_8B, dp=2, tp=8, pp=4, micro_batches=6, folding=folding)
    assert make_plan(cfg).boundaries == (1, 2, 4, 6)


def test_help_returns_zero(capsys):
    assert main(["--help"]) == 0
    assert "--micro-batches" in capsys.readouterr().out


def test_module_entry_point_without_torch():
    done = subprocess.run(
        [sys.executable, "-m", "mlfop_megatron.launch.plan", *TINY],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ML-FOP-SOAP plan" in done.stdout
    check = "import sys, mlfop_megatron.launch.plan.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.stdout.strip() == "False"
