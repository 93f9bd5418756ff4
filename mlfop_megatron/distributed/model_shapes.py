"""Per-rank parameter shapes of Megatron GPT/Llama models, for planning and benchmarks.

Shapes are those of one tensor-parallel rank, in Megatron GPTModel layout: fused QKV
(column-parallel, rows split), linear_proj (row-parallel, columns split), fused gate+up fc1
(column-parallel) and fc2 (row-parallel); vocab-parallel embedding and output layer with the
vocab padded like Megatron (:func:`mlfop_megatron.policies.padded_vocab_size`); 1-D RMSNorm
weights. Which of them SOAP preconditions is :func:`mlfop_megatron.policies.is_soap_matrix`
(the optimizer's own rule): attention and MLP linear weights; embeddings, output layer, norms
and biases go to AdamW unless ``precondition_embeddings`` asks otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlfop_megatron.distributed.assignment import ParamSpec
from mlfop_megatron.policies import check_positive, is_soap_matrix, padded_vocab_size

__all__ = [
    "LLAMA3_70B",
    "LLAMA3_8B",
    "MODELS",
    "TransformerDims",
    "llama3_70b_shapes",
    "llama3_8b_shapes",
    "model_shapes",
    "transformer_shapes",
]


def transformer_shapes(
    hidden: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tp: int = 1,
    *,
    head_dim: int | None = None,
    gated: bool = True,
    fuse_qkv: bool = True,
    fuse_gate_up: bool = True,
    tied_embeddings: bool = False,
    bias: bool = False,
    vocab_divisible_by: int = 128,
    precondition_embeddings: bool = False,
) -> list[ParamSpec]:
    """Per-TP-rank ParamSpecs of a decoder-only transformer, in Megatron parameter order.

    ``fuse_qkv=False`` / ``fuse_gate_up=False`` give the unfused (Hugging Face style) layout,
    which changes how many and how large the matrices are, not their total size.
    """
    for name, value in (
        ("hidden", hidden),
        ("ffn", ffn),
        ("layers", layers),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("vocab", vocab),
        ("tp", tp),
    ):
        check_positive(name, value)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        head_dim = hidden // heads
    check_positive("head_dim", head_dim)
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if heads % tp or kv_heads % tp:
        raise ValueError(f"tp ({tp}) must divide heads ({heads}) and kv_heads ({kv_heads})")
    if ffn % tp:
        raise ValueError(f"tp ({tp}) must divide ffn ({ffn})")

    q_rows, kv_rows = heads * head_dim // tp, kv_heads * head_dim // tp
    ffn_local = ffn // tp
    vocab_local = padded_vocab_size(vocab, tp, vocab_divisible_by) // tp

    def spec(name: str, shape: tuple[int, ...], kind: str, pdim: int | None = None) -> ParamSpec:
        soap = is_soap_matrix(name, len(shape))
        return ParamSpec(name, shape, preconditioned=soap, partition_dim=pdim, kind=kind)

    def vocab_parallel(name: str, kind: str) -> ParamSpec:
        shape = (vocab_local, hidden)
        return ParamSpec(name, shape, precondition_embeddings, partition_dim=0, kind=kind)

    qkv_rows = q_rows + 2 * kv_rows
    specs = [vocab_parallel("embedding.word_embeddings.weight", "embedding")]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        specs.append(spec(p + "input_layernorm.weight", (hidden,), "norm"))
        attn = p + "self_attention."
        if fuse_qkv:
            specs.append(spec(attn + "linear_qkv.weight", (qkv_rows, hidden), "attention", 0))
            if bias:
                specs.append(spec(attn + "linear_qkv.bias", (qkv_rows,), "bias", 0))
        else:
            for part, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                specs.append(spec(attn + f"linear_{part}.weight", (rows, hidden), "attention", 0))
                if bias:
                    specs.append(spec(attn + f"linear_{part}.bias", (rows,), "bias", 0))
        specs.append(spec(attn + "linear_proj.weight", (hidden, q_rows), "attention", 1))
        if bias:
            specs.append(spec(attn + "linear_proj.bias", (hidden,), "bias"))
        specs.append(spec(p + "pre_mlp_layernorm.weight", (hidden,), "norm"))
        mlp = p + "mlp."
        if gated and not fuse_gate_up:
            for part in ("gate", "up"):
                specs.append(spec(mlp + f"linear_{part}.weight", (ffn_local, hidden), "mlp", 0))
        else:
            rows = 2 * ffn_local if gated else ffn_local
            specs.append(spec(mlp + "linear_fc1.weight", (rows, hidden), "mlp", 0))
            if bias:
                specs.append(spec(mlp + "linear_fc1.bias", (rows,), "bias", 0))
        specs.append(spec(mlp + "linear_fc2.weight", (hidden, ffn_local), "mlp", 1))
        if bias:
            specs.append(spec(mlp + "linear_fc2.bias", (hidden,), "bias"))
    specs.append(spec("decoder.final_layernorm.weight", (hidden,), "norm"))
    if not tied_embeddings:
        specs.append(vocab_parallel("output_layer.weight", "output"))
    return specs


@dataclass(frozen=True)
class TransformerDims:
    """Architecture numbers of a decoder-only transformer."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None

    def shapes(self, tp: int = 1, **kwargs: object) -> list[ParamSpec]:
        """Per-TP-rank ParamSpecs (kwargs go to :func:`transformer_shapes`)."""
        return transformer_shapes(
            self.hidden,
            self.ffn,
            self.layers,
            self.heads,
            self.kv_heads,
            self.vocab,
            tp,
            head_dim=self.head_dim,
            **kwargs,  # type: ignore[arg-type]
        )


LLAMA3_8B = TransformerDims(
    hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=128256, head_dim=128
)
LLAMA3_70B = TransformerDims(
    hidden=8192, ffn=28672, layers=80, heads=64, kv_heads=8, vocab=128256, head_dim=128
)
MODELS: dict[str, TransformerDims] = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}


def llama3_8b_shapes(tp: int = 1, **kwargs: object) -> list[ParamSpec]:
    """Llama-3-8B per-TP-rank parameter shapes."""
    return LLAMA3_8B.shapes(tp, **kwargs)


def llama3_70b_shapes(tp: int = 1, **kwargs: object) -> list[ParamSpec]:
    """Llama-3-70B per-TP-rank parameter shapes."""
    return LLAMA3_70B.shapes(tp, **kwargs)


def model_shapes(name: str, tp: int = 1, **kwargs: object) -> list[ParamSpec]:
    """Shapes of a named model ("llama3-8b", "llama3-70b")."""
    try:
        dims = MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None
    return dims.shapes(tp, **kwargs)
