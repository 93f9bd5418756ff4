"""Digits data pipeline: a tiny Janus/Emu3-style unified image+text token stream.

Built from scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 images of
8x8 pixels, intensities 0..16, shipped inside scikit-learn, no download). Every image becomes 64
discrete image tokens (intensity quantised into ``num_levels`` levels) and every label a caption
such as "a handwritten seven". Two tasks share one vocabulary and one token stream:

* generation (text -> image):    ``<bos> <gen> a handwritten seven <boi> img*64 <eoi> <eos>``
* understanding (image -> text): ``<bos> <und> <boi> img*64 <eoi> a handwritten seven <eos>``

Next-token prediction in Megatron's convention: a padded stream ``full`` of ``seq_length + 1``
tokens gives ``tokens = full[:-1]`` and ``labels = full[1:]``, so ``labels[j] == tokens[j + 1]``.
Loss is taken on *targets* (labels) only:

* generation: exactly the 64 image-token targets ("image" modality). ``<eoi>`` and ``<eos>`` are
  not trained: as in Janus, decoding emits a fixed 64 image tokens and appends ``<eoi>`` by rule,
  and leaving these deterministic targets out keeps the image loss a pure pixel metric.
* understanding: the caption-word targets plus the closing ``<eos>`` ("text" modality), since the
  model must learn when to stop talking.

No loss on the prompt (``<bos>``, task token, conditioning caption or image, ``<boi>``/``<eoi>``
delimiters) nor on padding.

Sampling is a pure function of ``(seed, step, i)`` for sample ``i`` of the global batch at
``step`` (for a fixed global batch size), so data-parallel rank ``r`` with micro-batch ``b`` taking
``global[r*b:(r+1)*b]`` sees exactly the samples that DP=1 with micro-batch ``N*b`` sees.

Micro-batch layouts (``LAYOUTS``), for K = G / (b * dp) micro-steps per step:

* ``mixed``: each sample's task is drawn by a seeded shuffle of a 50/50 task list, so every
  micro-batch mixes both tasks at random (the two halves of a fold differ by sampling noise).
* ``by-modality``: the same rows, but micro-step k (its samples on every DP rank: the chunk
  ``global[k*b*dp:(k+1)*b*dp]``) holds one task: the first floor(K/2) micro-steps generation
  (image loss), the rest understanding (text loss). The global batch keeps mixed's 50/50 task
  split for even K (odd K: one more text micro-step; K=1 cannot hold two tasks and is
  refused). The order is the same for every fold structure: the final fold of ``last``,
  ``tree`` (K a power of two) and dyadic ``chain`` joins the image half with the text half,
  FOP's own half-vs-half split acting on the modality difference, while the earlier chain and
  tree folds join micro-steps of one modality (sampling noise, as in ``mixed``). The modality
  difference thus meets FOP exactly once, in the fold that decides the update, and the three
  structures differ only in their within-modality folds. Alternating tasks instead would put
  it into the first, lightest fold only. Depends on b * dp, not on b and dp apart: DP=N with
  micro-batch b still equals DP=1 with micro-batch N*b.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch

LAYOUTS = ("mixed", "by-modality")
TASK_GEN = 0  # text -> image
TASK_UND = 1  # image -> text
MODALITY_TEXT = 0
MODALITY_IMAGE = 1

IMAGE_SIDE = 8
IMAGE_TOKENS = IMAGE_SIDE * IMAGE_SIDE
MAX_INTENSITY = 16

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<gen>", "<und>")
CAPTION_WORDS: tuple[str, ...] = ("a", "handwritten", *DIGIT_NAMES)


@dataclass(frozen=True)
class DigitsVocab:
    """Token ids: specials, then ``num_levels`` image tokens, then caption words; one id space."""

    num_levels: int = 8
    specials: tuple[str, ...] = SPECIAL_TOKENS
    words: tuple[str, ...] = CAPTION_WORDS

    def __post_init__(self) -> None:
        """Validate the level count so that every intensity 0..16 maps to a level."""
        if not 2 <= self.num_levels <= MAX_INTENSITY + 1:
            raise ValueError(f"num_levels must be in [2, 17], got {self.num_levels}")

    # Special token ids (fixed positions at the start of the vocabulary).
    @property
    def pad(self) -> int:
        """Padding id (never a loss target)."""
        return self.specials.index("<pad>")

    @property
    def bos(self) -> int:
        """Begin-of-sequence id."""
        return self.specials.index("<bos>")

    @property
    def eos(self) -> int:
        """End-of-sequence id."""
        return self.specials.index("<eos>")

    @property
    def boi(self) -> int:
        """Begin-of-image delimiter id."""
        return self.specials.index("<boi>")

    @property
    def eoi(self) -> int:
        """End-of-image delimiter id."""
        return self.specials.index("<eoi>")

    @property
    def gen(self) -> int:
        """Task token for text -> image generation."""
        return self.specials.index("<gen>")

    @property
    def und(self) -> int:
        """Task token for image -> text understanding."""
        return self.specials.index("<und>")

    @property
    def image_offset(self) -> int:
        """Id of image level 0; image levels occupy ``[image_offset, image_offset+num_levels)``."""
        return len(self.specials)

    @property
    def word_offset(self) -> int:
        """Id of the first caption word."""
        return self.image_offset + self.num_levels

    @property
    def size(self) -> int:
        """Vocabulary size (number of distinct ids)."""
        return self.word_offset + len(self.words)

    @cached_property
    def strings(self) -> tuple[str, ...]:
        """String of every id, indexed by id."""
        levels = tuple(f"<img{k}>" for k in range(self.num_levels))
        return (*self.specials, *levels, *self.words)

    @cached_property
    def _ids(self) -> dict[str, int]:
        """Reverse map string -> id."""
        return {s: i for i, s in enumerate(self.strings)}

    def token_to_str(self, token: int) -> str:
        """String form of one id."""
        return self.strings[int(token)]

    def str_to_token(self, s: str) -> int:
        """Id of one token string (special, ``<imgK>`` or word)."""
        return self._ids[s]

    def decode(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        """Strings of a token sequence, for inspection and printing."""
        return [self.token_to_str(int(t)) for t in tokens]

    def encode(self, strings: Sequence[str]) -> list[int]:
        """Ids of a sequence of token strings."""
        return [self.str_to_token(s) for s in strings]

    def word_token(self, word: str) -> int:
        """Id of one caption word."""
        return self.word_offset + self.words.index(word)

    def caption_words(self, digit: int) -> tuple[str, ...]:
        """Caption of a digit class, e.g. ``("a", "handwritten", "seven")``."""
        return ("a", "handwritten", DIGIT_NAMES[int(digit)])

    def caption_tokens(self, digit: int) -> np.ndarray:
        """Caption ids of a digit class."""
        return np.asarray([self.word_token(w) for w in self.caption_words(digit)], np.int64)

    def quantise(self, intensities: np.ndarray) -> np.ndarray:
        """Uniform bins over the 17 intensities: ``level = v * num_levels // 17``."""
        v = np.asarray(intensities).astype(np.int64)
        if v.min(initial=0) < 0 or v.max(initial=0) > MAX_INTENSITY:
            raise ValueError("intensities must lie in 0..16")
        return v * self.num_levels // (MAX_INTENSITY + 1)

    def dequantise(self, levels: np.ndarray) -> np.ndarray:
        """Centre intensity (float, 0..16 scale) of each level's bin, for rendering samples."""
        lv = np.asarray(levels, dtype=np.float64)
        return (lv + 0.5) * (MAX_INTENSITY + 1) / self.num_levels - 0.5

    def image_tokens(self, image: np.ndarray) -> np.ndarray:
        """64 row-major image ids of an 8x8 intensity image."""
        return self.quantise(np.asarray(image).reshape(-1)) + self.image_offset

    def is_image(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Boolean mask of ids that are image-level tokens."""
        return (tokens >= self.image_offset) & (tokens < self.word_offset)

    def is_word(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Boolean mask of ids that are caption words."""
        return (tokens >= self.word_offset) & (tokens < self.size)

    def tokens_to_image(self, tokens: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """8x8 level array from 64 image ids (non-image ids become level 0); for sampling."""
        t = np.asarray([int(x) for x in tokens][:IMAGE_TOKENS], dtype=np.int64)
        lv = np.where(self.is_image(t), t - self.image_offset, 0)
        lv = np.pad(lv, (0, IMAGE_TOKENS - lv.size))
        return lv.reshape(IMAGE_SIDE, IMAGE_SIDE)


def raw_generation_sequence(vocab: DigitsVocab, image: np.ndarray, digit: int) -> np.ndarray:
    """Unpadded text->image stream ``[BOS, GEN, caption, BOI, img*64, EOI, EOS]``."""
    return np.concatenate(
        [
            [vocab.bos, vocab.gen],
            vocab.caption_tokens(digit),
            [vocab.boi],
            vocab.image_tokens(image),
            [vocab.eoi, vocab.eos],
        ]
    ).astype(np.int64)


def raw_understanding_sequence(vocab: DigitsVocab, image: np.ndarray, digit: int) -> np.ndarray:
    """Unpadded image->text stream ``[BOS, UND, BOI, img*64, EOI, caption, EOS]``."""
    return np.concatenate(
        [
            [vocab.bos, vocab.und, vocab.boi],
            vocab.image_tokens(image),
            [vocab.eoi],
            vocab.caption_tokens(digit),
            [vocab.eos],
        ]
    ).astype(np.int64)


def compute_seq_length(vocab: DigitsVocab, pad_to_multiple: int = 8) -> int:
    """Model sequence length: longest raw stream minus one (shift), rounded up to a multiple."""
    longest_caption = max(len(vocab.caption_words(d)) for d in range(len(DIGIT_NAMES)))
    raw = 2 + longest_caption + 1 + IMAGE_TOKENS + 2  # same for both tasks
    s = raw - 1
    m = max(1, int(pad_to_multiple))
    return -(-s // m) * m


@dataclass
class Sample:
    """One next-token-prediction sample, numpy arrays of length ``seq_length``."""

    tokens: np.ndarray  # int64 inputs
    labels: np.ndarray  # int64 targets, labels[j] == tokens[j + 1]
    loss_mask: np.ndarray  # float32, image_loss_mask + text_loss_mask
    image_loss_mask: np.ndarray  # float32, 1 on image-modality targets that are trained
    text_loss_mask: np.ndarray  # float32, 1 on text-modality targets that are trained
    modality: np.ndarray  # int64 per target: 1 if the label is an image token, else 0
    task: int
    index: int  # row in load_digits
    digit: int


def make_sample(
    vocab: DigitsVocab,
    image: np.ndarray,
    digit: int,
    task: int,
    seq_length: int,
    index: int = -1,
) -> Sample:
    """Build padded tokens/labels/masks for one image under one task."""
    if task == TASK_GEN:
        raw = raw_generation_sequence(vocab, image, digit)
    elif task == TASK_UND:
        raw = raw_understanding_sequence(vocab, image, digit)
    else:
        raise ValueError(f"unknown task {task}")
    if raw.size > seq_length + 1:
        raise ValueError(f"sequence of {raw.size} tokens exceeds seq_length+1={seq_length + 1}")
    full = np.full(seq_length + 1, vocab.pad, dtype=np.int64)
    full[: raw.size] = raw
    tokens, labels = full[:-1].copy(), full[1:].copy()
    img_t = vocab.is_image(labels)
    if task == TASK_GEN:
        image_mask, text_mask = img_t, np.zeros_like(img_t)
    else:
        # Targets after <eoi>: caption words and the closing <eos>.
        eoi_pos = int(np.flatnonzero(tokens == vocab.eoi)[0])
        after = np.arange(seq_length) >= eoi_pos
        text_mask = after & (vocab.is_word(labels) | (labels == vocab.eos))
        image_mask = np.zeros_like(text_mask)
    image_mask = image_mask.astype(np.float32)
    text_mask = text_mask.astype(np.float32)
    return Sample(
        tokens=tokens,
        labels=labels,
        loss_mask=image_mask + text_mask,
        image_loss_mask=image_mask,
        text_loss_mask=text_mask,
        modality=img_t.astype(np.int64),
        task=int(task),
        index=int(index),
        digit=int(digit),
    )


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor | None]:
    """Stack samples into the GPTModel batch: tokens/labels/loss_mask/position_ids [b, s]."""
    s = samples[0].tokens.size
    b = len(samples)

    def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(x, name) for x in samples])).to(dtype)

    return {
        "tokens": stack("tokens", torch.int64),
        "labels": stack("labels", torch.int64),
        "loss_mask": stack("loss_mask", torch.float32),
        "position_ids": torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s).clone(),
        "attention_mask": None,  # causal mask is implied by the attention mask type
        "image_loss_mask": stack("image_loss_mask", torch.float32),
        "text_loss_mask": stack("text_loss_mask", torch.float32),
        "modality": stack("modality", torch.int64),
        "task": torch.tensor([x.task for x in samples], dtype=torch.int64),
        "index": torch.tensor([x.index for x in samples], dtype=torch.int64),
        "digit": torch.tensor([x.digit for x in samples], dtype=torch.int64),
    }


def causal_attention_mask(seq_length: int) -> torch.Tensor:
    """Explicit causal mask [1, 1, s, s] bool (True = masked) for paths where None fails on CPU.

    megatron-core's local attention builds its default causal mask with ``device="cuda"``; on a
    CPU-only torch pass this mask instead of ``attention_mask=None``.
    """
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool).triu(diagonal=1)


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] int64 in 0..16, digits [1797] int64)``, cached (parsing is slow)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images).astype(np.int64)
    images.setflags(write=False)
    digits = np.asarray(d.target, dtype=np.int64)
    digits.setflags(write=False)
    return images, digits


def stratified_split(
    digits: np.ndarray,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into sorted (train, val) row indices; every class in both."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    train, val = [], []
    for c in np.unique(digits):
        rows = np.flatnonzero(digits == c)
        rows = rows[rng.permutation(rows.size)]
        n_val = int(round(rows.size * val_fraction))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass(frozen=True)
class DigitsDataConfig:
    """Knobs of the digits pipeline; everything downstream is a pure function of these."""

    num_levels: int = 8
    val_fraction: float = 0.1
    seed: int = 1234
    pad_to_multiple: int = 8


@dataclass
class DigitsData:
    """Vocabulary, split and deterministic DP-sliceable sampler over the digits corpus."""

    config: DigitsDataConfig = field(default_factory=DigitsDataConfig)

    def __post_init__(self) -> None:
        """Load data, build vocabulary, split and sequence length."""
        self.vocab = DigitsVocab(num_levels=self.config.num_levels)
        self.images, self.digits = load_digits_arrays()
        self.train_idx, self.val_idx = stratified_split(
            self.digits,
            self.config.val_fraction,
            self.config.seed,
        )
        self.seq_length = compute_seq_length(self.vocab, self.config.pad_to_multiple)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size to give GPTModel."""
        return self.vocab.size

    def split_indices(self, split: str) -> np.ndarray:
        """Row indices of ``"train"`` or ``"val"``."""
        if split == "train":
            return self.train_idx
        if split == "val":
            return self.val_idx
        raise ValueError(f"unknown split {split!r}")

    def sample(self, index: int, task: int) -> Sample:
        """Sample of load_digits row ``index`` under ``task``."""
        return make_sample(
            self.vocab,
            self.images[index],
            int(self.digits[index]),
            task,
            self.seq_length,
            index=index,
        )

    def global_batch_spec(
        self,
        step: int,
        global_batch_size: int,
        split: str = "train",
        layout: str = "mixed",
        micro_samples: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, tasks) of the global batch at ``step``; pure in (seed, step, i).

        Rows: the ``g = step*G + i``-th draw of an epoch-wise seeded shuffle (epoch ``g // n``,
        position ``g % n``), so each epoch visits every row once. Tasks (``layout="mixed"``): a
        seeded permutation of ``G//2`` generation and ``G - G//2`` understanding slots, so each
        global batch is 50/50. ``layout="by-modality"``: the same rows; ``micro_samples``
        (samples per micro-step over all DP ranks, b * dp) cut the batch into micro-steps and
        ``modality_tasks`` gives each its task (see the module docstring).
        """
        rows = self.split_indices(split)
        n, g0 = rows.size, int(step) * int(global_batch_size)
        g = g0 + np.arange(global_batch_size)
        epochs, pos = g // n, g % n
        out = np.empty(global_batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng(np.random.SeedSequence([self.config.seed, 1, int(e)]))
            order = perm.permutation(n)
            sel = epochs == e
            out[sel] = rows[order[pos[sel]]]
        if layout == "by-modality":
            if micro_samples is None:
                raise ValueError("layout 'by-modality' needs micro_samples (b * dp)")
            k = num_micro_batches(global_batch_size, micro_samples)
            return out, np.repeat(modality_tasks(k), micro_samples)
        if layout != "mixed":
            raise ValueError(f"unknown micro-batch layout {layout!r} (one of {LAYOUTS})")
        balanced = np.arange(global_batch_size) % 2  # alternate GEN/UND, then shuffle
        trng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 2, int(step)]))
        tasks = balanced[trng.permutation(global_batch_size)].astype(np.int64)
        return out, tasks

    def token_counts(
        self,
        step: int,
        global_batch_size: int,
        split: str = "train",
        layout: str = "mixed",
        micro_samples: int | None = None,
    ) -> tuple[int, int]:
        """(image, text) loss-token counts of the global batch at ``step`` (host integers)."""
        rows, tasks = self.global_batch_spec(
            step, global_batch_size, split, layout=layout, micro_samples=micro_samples
        )
        image = text = 0
        for r, t in zip(rows, tasks):
            sample = self.sample(int(r), int(t))
            image += int(sample.image_loss_mask.sum())
            text += int(sample.text_loss_mask.sum())
        return image, text

    def global_batch(
        self,
        step: int,
        global_batch_size: int,
        split: str = "train",
    ) -> dict[str, torch.Tensor | None]:
        """Whole global batch at ``step`` as one tensor batch (what DP=1, one micro-batch sees)."""
        rows, tasks = self.global_batch_spec(step, global_batch_size, split)
        return collate([self.sample(int(r), int(t)) for r, t in zip(rows, tasks)])

    def micro_batch(
        self,
        step: int,
        global_batch_size: int,
        micro_batch_size: int,
        micro_idx: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        split: str = "train",
        layout: str = "mixed",
    ) -> dict[str, torch.Tensor | None]:
        """Micro-batch ``micro_idx`` of DP rank ``dp_rank`` at ``step`` (Megatron ordering).

        The global batch is cut into ``num_micro = G // (b * dp_size)`` consecutive chunks of
        ``b * dp_size`` samples; rank ``r`` takes ``chunk[r*b:(r+1)*b]`` of chunk ``micro_idx``.
        With ``layout="by-modality"`` every chunk (so micro-step ``micro_idx`` on every DP
        rank) holds one task.
        """
        b = int(micro_batch_size)
        n_micro = num_micro_batches(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= micro_idx < n_micro or not 0 <= dp_rank < dp_size:
            raise ValueError(f"micro_idx {micro_idx} / dp_rank {dp_rank} out of range")
        rows, tasks = self.global_batch_spec(
            step, global_batch_size, split, layout=layout, micro_samples=b * int(dp_size)
        )
        start = micro_idx * b * dp_size + dp_rank * b
        sl = slice(start, start + b)
        return collate([self.sample(int(r), int(t)) for r, t in zip(rows[sl], tasks[sl])])

    def eval_batches(
        self,
        micro_batch_size: int,
        split: str = "val",
        tasks: Sequence[int] = (TASK_GEN, TASK_UND),
    ) -> Iterator[dict[str, torch.Tensor | None]]:
        """Fixed-order pass over a split: every row under each task, last batch may be short."""
        items = [(int(r), int(t)) for t in tasks for r in self.split_indices(split)]
        for k in range(0, len(items), micro_batch_size):
            yield collate([self.sample(r, t) for r, t in items[k : k + micro_batch_size]])


def num_micro_batches(global_batch_size: int, micro_batch_size: int, dp_size: int = 1) -> int:
    """Gradient-accumulation steps ``G / (b * dp)``; raises unless it divides exactly."""
    per = int(micro_batch_size) * int(dp_size)
    if per <= 0 or global_batch_size % per:
        raise ValueError(
            f"global batch {global_batch_size} not divisible by micro {micro_batch_size} x dp"
            f" {dp_size}"
        )
    return global_batch_size // per


def modality_tasks(num_micro: int) -> np.ndarray:
    """Task of each micro-step in the by-modality layout.

    The first floor(K/2) are generation (image loss), the rest understanding (text loss).
    """
    if num_micro < 2:
        raise ValueError(
            f"layout 'by-modality' needs at least 2 micro-steps per step (got {num_micro}): one "
            "micro-batch cannot hold one task per micro-batch and both tasks per step; use a "
            "smaller micro-batch or layout 'mixed'"
        )
    half = num_micro // 2
    return np.array([TASK_GEN] * half + [TASK_UND] * (num_micro - half), dtype=np.int64)


def micro_step_groups(layout: str, num_micro: int) -> list[int] | None:
    """Grad-group ids per micro-step for the optimizer's diagnostics.

    0 image (generation), 1 text (understanding) in the by-modality layout; None (one group)
    for mixed.
    """
    if layout == "mixed":
        return None
    return [0 if t == TASK_GEN else 1 for t in modality_tasks(num_micro)]


def masked_losses(
    per_token_loss: torch.Tensor,
    batch: dict[str, torch.Tensor | None],
) -> dict[str, torch.Tensor]:
    """Mean loss overall and per modality from GPTModel's per-token loss [b, s]."""
    out = {}
    for key, mask_name in (
        ("loss", "loss_mask"),
        ("image_loss", "image_loss_mask"),
        ("text_loss", "text_loss_mask"),
    ):
        m = batch[mask_name]
        assert m is not None
        m = m.to(per_token_loss.dtype)
        out[key] = (per_token_loss * m).sum() / m.sum().clamp_min(1.0)
    return out


__all__ = [
    "CAPTION_WORDS",
    "DIGIT_NAMES",
    "IMAGE_SIDE",
    "IMAGE_TOKENS",
    "LAYOUTS",
    "MODALITY_IMAGE",
    "MODALITY_TEXT",
    "SPECIAL_TOKENS",
    "TASK_GEN",
    "TASK_UND",
    "DigitsData",
    "DigitsDataConfig",
    "DigitsVocab",
    "Sample",
    "causal_attention_mask",
    "collate",
    "compute_seq_length",
    "load_digits_arrays",
    "make_sample",
    "masked_losses",
    "micro_step_groups",
    "modality_tasks",
    "num_micro_batches",
    "raw_generation_sequence",
    "raw_understanding_sequence",
    "stratified_split",
]
