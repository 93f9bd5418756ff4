"""Tests of the digits unified image+text data pipeline (examples/digits/data.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from examples.digits import data as dd  # noqa: E402

# load_digits()[0] is a zero; its first row of intensities is 0 0 5 13 9 1 0 0.
ROW0 = [0, 0, 5, 13, 9, 1, 0, 0]
ROW0_LEVELS8 = [0, 0, 2, 6, 4, 0, 0, 0]  # v * 8 // 17 by hand
ROW0_LEVELS4 = [0, 0, 1, 3, 2, 0, 0, 0]  # v * 4 // 17 by hand


@pytest.fixture(scope="module")
def data() -> dd.DigitsData:
    """Default pipeline (8 levels), shared by the module to parse load_digits once."""
    return dd.DigitsData()


def test_vocab_layout_and_uniqueness(data: dd.DigitsData) -> None:
    """Vocabulary has 7 specials + 8 levels + 12 words, all strings unique and round-tripping."""
    v = data.vocab
    assert v.size == 7 + 8 + 12 == 27 == data.vocab_size
    assert len(set(v.strings)) == v.size
    assert (v.pad, v.bos, v.eos, v.boi, v.eoi, v.gen, v.und) == (0, 1, 2, 3, 4, 5, 6)
    assert v.image_offset == 7 and v.word_offset == 15
    for t in range(v.size):
        assert v.str_to_token(v.token_to_str(t)) == t
    assert v.decode(v.encode(["<bos>", "<img3>", "seven"])) == ["<bos>", "<img3>", "seven"]
    assert v.str_to_token("<img3>") == 10
    assert dd.DigitsVocab(num_levels=4).size == 23


def test_quantisation_bins() -> None:
    """Every intensity 0..16 maps monotonically onto all levels, first and last bins at ends."""
    for L in (4, 8):
        lv = dd.DigitsVocab(num_levels=L).quantise(np.arange(17))
        assert lv[0] == 0 and lv[16] == L - 1
        assert np.all(np.diff(lv) >= 0) and set(lv.tolist()) == set(range(L))
    four = [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4
    assert dd.DigitsVocab(4).quantise(np.arange(17)).tolist() == four
    with pytest.raises(ValueError):
        dd.DigitsVocab(num_levels=1)


def test_load_digits_sample0(data: dd.DigitsData) -> None:
    """Row 0 of load_digits is a zero with the known first image row."""
    assert data.images.shape == (1797, 8, 8) and data.digits.shape == (1797,)
    assert int(data.digits[0]) == 0
    assert data.images[0, 0].tolist() == ROW0


def test_generation_layout_sample0(data: dd.DigitsData) -> None:
    """Text->image: BOS GEN 'a handwritten zero' BOI img*64 EOI EOS at known positions."""
    v = data.vocab
    assert data.seq_length == 72
    s = data.sample(0, dd.TASK_GEN)
    toks = s.tokens
    assert toks.shape == (72,) and toks.dtype == np.int64
    assert v.decode(toks[:6]) == ["<bos>", "<gen>", "a", "handwritten", "zero", "<boi>"]
    assert toks[2:5].tolist() == [15, 16, 17]  # 'a', 'handwritten', 'zero'
    assert toks[6:14].tolist() == [v.image_offset + k for k in ROW0_LEVELS8]
    assert v.decode(toks[6:14]) == [f"<img{k}>" for k in ROW0_LEVELS8]
    assert toks[70] == v.eoi and toks[71] == v.eos
    assert v.is_image(toks[6:70]).all() and not v.is_image(toks[:6]).any()
    levels = v.tokens_to_image(toks[6:70])
    np.testing.assert_array_equal(levels, v.quantise(data.images[0]))
    # labels: shifted by one, the final target (after EOS) is padding.
    assert s.labels[:-1].tolist() == toks[1:].tolist()
    assert s.labels[-1] == v.pad


def test_understanding_layout_sample0(data: dd.DigitsData) -> None:
    """Image->text: BOS UND BOI img*64 EOI 'a handwritten zero' EOS at known positions."""
    v = data.vocab
    s = data.sample(0, dd.TASK_UND)
    toks = s.tokens
    assert toks[:3].tolist() == [v.bos, v.und, v.boi]
    assert toks[3:11].tolist() == [v.image_offset + k for k in ROW0_LEVELS8]
    assert toks[67] == v.eoi
    assert v.decode(toks[68:71]) == ["a", "handwritten", "zero"]
    assert toks[71] == v.eos
    assert s.labels[:-1].tolist() == toks[1:].tolist() and s.labels[-1] == v.pad


def test_four_levels_row0() -> None:
    """With 4 levels the first row of sample 0 quantises to the hand-computed levels."""
    d4 = dd.DigitsData(dd.DigitsDataConfig(num_levels=4))
    s = d4.sample(0, dd.TASK_GEN)
    assert s.tokens[6:14].tolist() == [d4.vocab.image_offset + k for k in ROW0_LEVELS4]
    assert d4.vocab_size == 23 and d4.seq_length == 72


def test_caption_of_a_seven(data: dd.DigitsData) -> None:
    """load_digits row 7 is a seven; its caption reads 'a handwritten seven'."""
    assert int(data.digits[7]) == 7
    s = data.sample(7, dd.TASK_UND)
    assert data.vocab.decode(s.labels[s.text_loss_mask > 0]) == [
        "a",
        "handwritten",
        "seven",
        "<eos>",
    ]


@pytest.mark.parametrize("index", [0, 5, 123, 1796])
def test_masks_select_exact_targets(data: dd.DigitsData, index: int) -> None:
    """Generation trains exactly the 64 image targets; understanding exactly caption + EOS."""
    v = data.vocab
    g = data.sample(index, dd.TASK_GEN)
    assert g.loss_mask.dtype == np.float32
    np.testing.assert_array_equal(g.loss_mask, g.image_loss_mask)
    assert g.text_loss_mask.sum() == 0 and g.image_loss_mask.sum() == 64
    np.testing.assert_array_equal(g.image_loss_mask > 0, v.is_image(g.labels))
    np.testing.assert_array_equal(np.flatnonzero(g.loss_mask), np.arange(5, 69))
    np.testing.assert_array_equal(g.labels[g.loss_mask > 0], v.image_tokens(data.images[index]))

    u = data.sample(index, dd.TASK_UND)
    np.testing.assert_array_equal(u.loss_mask, u.text_loss_mask)
    assert u.image_loss_mask.sum() == 0 and u.text_loss_mask.sum() == 4
    np.testing.assert_array_equal(np.flatnonzero(u.loss_mask), np.arange(67, 71))
    expect = np.append(v.caption_tokens(int(data.digits[index])), v.eos)
    np.testing.assert_array_equal(u.labels[u.loss_mask > 0], expect)

    for s in (g, u):
        assert not (s.loss_mask[s.labels == v.pad]).any()  # no loss on padding
        assert not (s.loss_mask[s.tokens == v.pad]).any()
        np.testing.assert_array_equal(s.modality, v.is_image(s.labels).astype(np.int64))
        assert set(np.unique(s.loss_mask).tolist()) <= {0.0, 1.0}


def test_split_is_seeded_disjoint_stratified(data: dd.DigitsData) -> None:
    """Train/val partition all rows, every class in val, same split for the same seed."""
    tr, va = data.train_idx, data.val_idx
    assert tr.size + va.size == 1797 and np.intersect1d(tr, va).size == 0
    assert 170 <= va.size <= 190
    assert set(data.digits[va].tolist()) == set(range(10))
    again = dd.stratified_split(data.digits, 0.1, 1234)
    np.testing.assert_array_equal(again[0], tr)
    np.testing.assert_array_equal(again[1], va)
    other = dd.stratified_split(data.digits, 0.1, 99)
    assert not np.array_equal(other[1], va)


def test_batch_format_for_gptmodel(data: dd.DigitsData) -> None:
    """Micro-batch tensors have GPTModel's shapes/dtypes; attention_mask is None (causal)."""
    b = data.micro_batch(step=3, global_batch_size=8, micro_batch_size=4)
    assert b["attention_mask"] is None
    for k in ("tokens", "labels", "position_ids", "modality"):
        assert b[k].shape == (4, 72) and b[k].dtype == torch.int64, k
    for k in ("loss_mask", "image_loss_mask", "text_loss_mask"):
        assert b[k].shape == (4, 72) and b[k].dtype == torch.float32, k
    assert torch.equal(b["position_ids"][2], torch.arange(72))
    assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    assert torch.equal(b["loss_mask"], b["image_loss_mask"] + b["text_loss_mask"])
    assert int(b["tokens"].max()) < data.vocab_size and int(b["tokens"].min()) >= 0
    m = dd.causal_attention_mask(72)
    assert m.shape == (1, 1, 72, 72) and m.dtype == torch.bool
    assert not m[0, 0, 5, :6].any() and m[0, 0, 5, 6:].all()
    losses = dd.masked_losses(torch.ones(4, 72), b)
    assert all(abs(float(x) - 1.0) < 1e-6 for x in losses.values())


def test_batches_deterministic_and_from_train(data: dd.DigitsData) -> None:
    """The same (seed, step) gives identical batches on every call and from a fresh pipeline."""
    a = data.global_batch(step=11, global_batch_size=16)
    b = dd.DigitsData().global_batch(step=11, global_batch_size=16)
    for k in ("tokens", "labels", "loss_mask", "task", "index"):
        assert torch.equal(a[k], b[k]), k
    c = data.global_batch(step=12, global_batch_size=16)
    assert not torch.equal(a["index"], c["index"])
    assert set(a["index"].tolist()) <= set(data.train_idx.tolist())
    other_seed = dd.DigitsData(dd.DigitsDataConfig(seed=7)).global_batch(11, 16)
    assert not torch.equal(a["index"], other_seed["index"])


def test_epoch_covers_train_once(data: dd.DigitsData) -> None:
    """Consecutive steps walk a seeded shuffle: the first len(train) draws are a permutation."""
    n, G = data.train_idx.size, 32
    rows = np.concatenate([data.global_batch_spec(s, G)[0] for s in range(-(-n // G))])
    np.testing.assert_array_equal(np.sort(rows[:n]), data.train_idx)


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1), (2, 4)])
def test_dp_slices_concatenate_to_dp1(data: dd.DigitsData, dp_size: int, micro: int) -> None:
    """DP=N micro b: rank slices concatenated == DP=1 micro N*b, for every micro-batch."""
    G, step = 16, 5
    n_micro = dd.num_micro_batches(G, micro, dp_size)
    assert dd.num_micro_batches(G, micro * dp_size, 1) == n_micro
    whole = data.global_batch(step, G)
    for m in range(n_micro):
        ref = data.micro_batch(step, G, micro * dp_size, micro_idx=m)
        parts = [
            data.micro_batch(step, G, micro, micro_idx=m, dp_rank=r, dp_size=dp_size)
            for r in range(dp_size)
        ]
        for k in (
            "tokens",
            "labels",
            "loss_mask",
            "image_loss_mask",
            "text_loss_mask",
            "position_ids",
            "task",
            "index",
        ):
            cat = torch.cat([p[k] for p in parts])
            assert torch.equal(cat, ref[k]), k
            sl = slice(m * micro * dp_size, (m + 1) * micro * dp_size)
            assert torch.equal(cat, whole[k][sl]), k


def test_task_mix_is_half_half(data: dd.DigitsData) -> None:
    """Every global batch holds G/2 generation and G/2 understanding samples, in varying slots."""
    slots = []
    for step in range(20):
        rows, tasks = data.global_batch_spec(step, 16)
        assert int((tasks == dd.TASK_GEN).sum()) == 8 and int((tasks == dd.TASK_UND).sum()) == 8
        slots.append(tasks)
    assert len({t.tobytes() for t in slots}) > 1
    b = data.global_batch(0, 16)
    gen = b["task"] == dd.TASK_GEN
    assert torch.equal(b["image_loss_mask"].sum(1) > 0, gen)
    assert torch.equal(b["text_loss_mask"].sum(1) > 0, ~gen)
    _, odd = data.global_batch_spec(0, 7)
    assert abs(int((odd == dd.TASK_GEN).sum()) - int((odd == dd.TASK_UND).sum())) == 1


def test_eval_batches_cover_val_under_both_tasks(data: dd.DigitsData) -> None:
    """The eval pass visits each validation row once per task, in a fixed order."""
    batches = list(data.eval_batches(64))
    idx = torch.cat([b["index"] for b in batches])
    task = torch.cat([b["task"] for b in batches])
    n = data.val_idx.size
    assert idx.numel() == 2 * n and int((task == dd.TASK_GEN).sum()) == n
    assert sorted(idx[task == dd.TASK_UND].tolist()) == data.val_idx.tolist()
    again = torch.cat([b["tokens"] for b in data.eval_batches(64)])
    assert torch.equal(again, torch.cat([b["tokens"] for b in batches]))


def test_micro_batch_rejects_bad_geometry(data: dd.DigitsData) -> None:
    """Global batch must divide into micro x DP; rank and micro index must be in range."""
    with pytest.raises(ValueError):
        dd.num_micro_batches(10, 4, 1)
    with pytest.raises(ValueError):
        data.micro_batch(0, 8, 2, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError):
        data.sample(0, 5)


@pytest.mark.parametrize("dp_size,micro", [(1, 2), (2, 2), (4, 1), (2, 1)])
def test_by_modality_layout_one_task_per_micro_step_on_every_rank(
    data: dd.DigitsData, dp_size: int, micro: int
) -> None:
    """by-modality: micro-step k holds one task on every DP rank.

    Image first, text second half; the rows are mixed's, the split stays 50/50, and DP=N
    micro b equals DP=1 micro N*b.
    """
    G, step = 16, 4
    k = dd.num_micro_batches(G, micro, dp_size)
    mixed_rows, mixed_tasks = data.global_batch_spec(step, G)
    rows, tasks = data.global_batch_spec(
        step, G, layout="by-modality", micro_samples=micro * dp_size
    )
    np.testing.assert_array_equal(rows, mixed_rows)
    assert np.bincount(tasks, minlength=2).tolist() == np.bincount(mixed_tasks).tolist()
    for m in range(k):
        parts = [
            data.micro_batch(step, G, micro, m, r, dp_size, layout="by-modality")
            for r in range(dp_size)
        ]
        ref = data.micro_batch(step, G, micro * dp_size, m, layout="by-modality")
        expect = dd.TASK_GEN if m < k // 2 else dd.TASK_UND
        for p in parts:
            assert set(p["task"].tolist()) == {expect}
            modality = p["image_loss_mask"] if expect == dd.TASK_GEN else p["text_loss_mask"]
            assert bool((modality.sum(1) > 0).all())
        for key in ("tokens", "labels", "loss_mask", "task", "index"):
            assert torch.equal(torch.cat([p[key] for p in parts]), ref[key]), key
    assert dd.micro_step_groups("by-modality", k) == [0] * (k // 2) + [1] * (k - k // 2)
    assert dd.micro_step_groups("mixed", k) is None


def test_by_modality_layout_odd_and_single_micro_step(data: dd.DigitsData) -> None:
    """Odd K: one more text micro-step (the closest split with one task per micro-step).

    K=1 cannot hold both tasks and is refused; unknown layouts are refused.
    """
    _, tasks = data.global_batch_spec(0, 12, layout="by-modality", micro_samples=4)
    assert tasks.tolist() == [dd.TASK_GEN] * 4 + [dd.TASK_UND] * 8
    with pytest.raises(ValueError, match="at least 2 micro-steps"):
        data.micro_batch(0, 8, 4, 0, 0, 2, layout="by-modality")
    with pytest.raises(ValueError, match="unknown micro-batch layout"):
        data.global_batch_spec(0, 8, layout="alternating")
