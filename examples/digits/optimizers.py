"""Every optimizer the digits demo trains, in one table: name -> how it is built.

``--optimizer``, ``--compare``, the default learning rates (``spec.DEFAULT_LR``), the DDP class
of the model (``model.build_model``) and the optimizer itself (``model.build_optimizer``) all
read ``TABLE``. Each entry says what it needs installed; ``missing()`` gives the reason it
cannot run here (None when it can).

Ours, from the package's factory ``get_mlfop_optimizer``: ``mlfop`` (ML-FOP-SOAP, folding on:
``FoldingConfig(enabled=True)``), ``soap`` (the same code, folding off: the package's default)
and ``adamw`` (the factory's Adam-only chain).

Peers, what a Megatron 0.19 user would pick instead, built exactly as Megatron-LM builds them:
``megatron.core.optimizer.get_megatron_optimizer(OptimizerConfig(optimizer="soap"|"muon"))``
with Megatron's own defaults for every optimizer-specific field (``soap_*``, ``muon_*``), the
run's lr / weight decay / Adam betas and eps / clipping / precision, the plain (not layer-wise)
path (``use_distributed_optimizer=False``) and Megatron's standard DistributedDataParallel.
Megatron routes embeddings, the output layer and every non-2-D param to Adam itself. They need
megatron-core >= 0.19 with NVIDIA's emerging-optimizers 0.3.0 (``make setup-peers`` builds
``.venv-peers``). Not for peers: checkpoints (Megatron's SOAP cannot save its torch_dist
optimizer state: factor shapes differ from the param's) and the grad-group diagnostics (ours).

The peers' layer-wise distributed optimizer (``RunSpec.megatron_layer_wise``, see
``LAYER_WISE``; benchmarks/peers_cost.py): Megatron-LM's ``--use-distributed-optimizer`` for an
emerging optimizer, built as Megatron-LM 0.19's ``get_model`` builds it (its own
``resolve_ddp_bucket_size`` and ``wrap_model_chunks_with_ddp``: params tagged, the
LayerWiseDistributedOptimizer layout computed and handed to DDP) and
``OptimizerConfig(use_layer_wise_distributed_optimizer=True)``, in bf16 (``--bf16``: with fp32
params 0.19.2's ``get_megatron_optimizer`` fails, ``LAYER_WISE_FP32``). Two CPU stand-ins,
for the CPU only: while the optimizer is built, ``Tensor.type()`` names emulated "cuda"
tensors as CUDA ones (Megatron's DistributedOptimizer, which takes the non-matrix params,
refuses anything but ``torch.cuda.*Tensor``), and for the ping-pong fallback gloo is given the
all-gather of unequal sizes that NCCL runs and gloo refuses (``gloo_uneven_all_gather``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import RunSpec

SETUP_PEERS = (
    "make setup-peers (builds .venv-peers: megatron-core 0.19.2 + emerging-optimizers 0.3.0)"
)
PEER_CHECKPOINT_REASON = (
    "checkpoints of Megatron's emerging optimizers are not supported by the demo (Megatron "
    "SOAP's torch_dist optimizer state cannot be saved: its factor shapes differ from the param's)"
)

# RunSpec.megatron_layer_wise -> what it builds (Megatron-LM's flags), peers only.
LAYER_WISE = {
    "": "plain path: use_distributed_optimizer=False, fp32",
    "layout": "--use-distributed-optimizer --bf16: LayerWiseDistributedOptimizer, its "
    "per-bucket layout (0.19's default)",
    "pingpong": "--use-distributed-optimizer --no-use-layer-wise-param-layout --bf16: its "
    "ping-pong fallback (all params in one layer-wise buffer, uneven all-gather)",
}
LAYER_WISE_FP32 = (
    "megatron-core 0.19.2's layer-wise optimizer fails with fp32 params: it chains the bare "
    "torch optimizers (no config) with a DistributedOptimizer, and ChainedOptimizer asserts "
    "equal configs"
)


def check_layer_wise(spec: RunSpec) -> None:
    """Refuse a ``megatron_layer_wise`` value that is unknown or set for one of ours."""
    value = spec.megatron_layer_wise
    if value not in LAYER_WISE:
        raise ValueError(f"megatron_layer_wise={value!r}: expected one of {sorted(LAYER_WISE)}")
    if value and TABLE[spec.optimizer].ours:
        raise ValueError(
            f"megatron_layer_wise={value!r} is for Megatron's peers; {spec.optimizer!r} shards "
            "its state with the package's own layout"
        )


# ----------------------------------------------------------------------------------- builders
def check_megatron_options(spec: RunSpec) -> dict[str, Any]:
    """``spec.megatron_options`` as a dict, refused for ours or where not OptimizerConfig's."""
    from megatron.core.optimizer import OptimizerConfig

    options = dict(spec.megatron_options)
    if not options:
        return options
    if TABLE[spec.optimizer].ours:
        raise ValueError(
            f"megatron_options {sorted(options)} are Megatron OptimizerConfig fields for "
            f"Megatron's peers; {spec.optimizer!r} takes SOAP options (soap_options)"
        )
    known = {f.name for f in dataclasses.fields(OptimizerConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"megatron_options {unknown} are not fields of this megatron-core's "
            "OptimizerConfig; name fields it has (e.g. soap_use_kl_shampoo on 0.19)"
        )
    return options


def optimizer_config(spec: RunSpec, optimizer: str = "adam") -> Any:
    """The run's Megatron OptimizerConfig: lr, weight decay, Adam betas / eps, clipping, fp32.

    The same numbers for every entry (the Adam part of ours and of Megatron's peers); every
    other field keeps Megatron's default (for the peers: ``soap_*`` and ``muon_*``) unless
    ``spec.megatron_options`` sets it (peers only). A layer-wise peer
    (``spec.megatron_layer_wise``) sets ``use_layer_wise_distributed_optimizer`` and bf16, as
    Megatron-LM's arguments do.
    """
    from megatron.core.optimizer import OptimizerConfig

    layer_wise = bool(spec.megatron_layer_wise)
    fields: dict[str, Any] = dict(
        optimizer=optimizer,
        lr=spec.lr,
        min_lr=spec.lr * spec.min_lr_frac,
        weight_decay=spec.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=spec.clip_grad,
        bf16=layer_wise,
        fp16=False,
        use_distributed_optimizer=False,
    )
    if layer_wise:
        fields["use_layer_wise_distributed_optimizer"] = True
    fields.update(check_megatron_options(spec))
    return OptimizerConfig(**fields)


@contextlib.contextmanager
def cuda_type_names_on_cpu() -> Iterator[None]:
    """Under the CPU emulation: ``Tensor.type()`` says ``torch.cuda.<T>Tensor`` (see module).

    Megatron's DistributedOptimizer sorts params by ``param.type()`` when it is built and
    raises for anything but CUDA tensors; with the CPU emulation every "cuda" tensor is a CPU
    one. Nothing changes without the emulation, and nothing outside the block.
    """
    import torch

    from mlfop_megatron.runtime.cpu_emulation import is_cpu_emulation_installed

    if not is_cpu_emulation_installed():
        yield
        return
    real = torch.Tensor.type

    def cuda_type(self: Any, *args: Any, **kwargs: Any) -> Any:
        name = real(self, *args, **kwargs)
        if args or kwargs or name.startswith("torch.cuda."):
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_type  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = real  # type: ignore[method-assign]


def gloo_uneven_all_gather() -> None:
    """Let ``torch.distributed.all_gather`` take unequal sizes on gloo (CPU runs only).

    The layer-wise ping-pong fallback all-gathers each rank's flattened params, unequal in
    size: NCCL runs that, gloo refuses it. On a gloo group with unequal sizes the call pads to
    the largest, gathers and copies each piece back; any other call is unchanged. Installed
    once per process, before any counting, so ``comm_counter`` counts the call's own
    (unpadded) sizes, as NCCL moves them.
    """
    import torch
    import torch.distributed as dist

    real = dist.all_gather
    if getattr(real, "uneven_on_gloo", False):
        return

    def all_gather(
        tensor_list: list[Any], tensor: Any, group: Any = None, async_op: bool = False
    ) -> Any:
        sizes = {t.numel() for t in tensor_list} | {tensor.numel()}
        if len(sizes) == 1 or async_op or dist.get_backend(group) != "gloo":
            return real(tensor_list, tensor, group=group, async_op=async_op)
        n = max(sizes)
        src = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
        src[: tensor.numel()].copy_(tensor.reshape(-1))
        padded = [torch.empty_like(src) for _ in tensor_list]
        real(padded, src, group=group)
        for out, got in zip(tensor_list, padded):
            out.view(-1).copy_(got[: out.numel()])
        return None

    all_gather.uneven_on_gloo = True  # type: ignore[attr-defined]
    dist.all_gather = all_gather


def build_mlfop(spec: RunSpec, model: Any, accumulation_steps: int) -> Any:
    """ML-FOP-SOAP (``mlfop``) or SOAP with folding off (``soap``) from the package's factory."""
    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer

    soap = (
        {}
        if spec.precondition_frequency is None
        else {"precondition_frequency": spec.precondition_frequency}
    )
    mlfop = MLFOPConfig.from_kwargs(
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        accumulation_steps=accumulation_steps,
        **soap,
        enabled=spec.optimizer == "mlfop",
        project=spec.fold_project,
        fixed_beta=spec.fold_fixed_beta,
        structure=spec.fold_structure,
        step_size=spec.step_size,
        statistics_from=spec.statistics_from,
    )
    options = dict(spec.soap_options)
    # ShardingConfig's, not SOAPConfig's
    block_size = options.pop("block_size", None)
    position_embeddings = options.pop("position_embeddings", "adam")
    if options:
        mlfop = mlfop.with_soap(**options)
    return get_mlfop_optimizer(
        optimizer_config(spec),
        [model],
        mlfop,
        sharded=True,
        block_size=block_size,
        position_embeddings=position_embeddings,
    )


def build_adamw(spec: RunSpec, model: Any, accumulation_steps: int) -> Any:
    """AdamW through the factory's Adam-only chain (``adam_only=True``).

    torch AdamW (apex FusedAdam on CUDA with apex) in Megatron's FP32Optimizer, weight decay on
    matrices only, as megatron's get_megatron_optimizer builds it; chained like the Adam part
    of ML-FOP-SOAP, so global norm, clipping and the inf check are the same code.
    """
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer

    return get_mlfop_optimizer(optimizer_config(spec), [model], adam_only=True)


def build_megatron_emerging(name: str) -> Callable[[RunSpec, Any, int], Any]:
    """Builder of Megatron's own emerging optimizer ``name`` ("soap", "muon")."""

    def build(spec: RunSpec, model: Any, accumulation_steps: int) -> Any:
        from megatron.core.optimizer import get_megatron_optimizer

        check_layer_wise(spec)
        layer_wise = contextlib.nullcontext()
        if spec.megatron_layer_wise:
            layer_wise = cuda_type_names_on_cpu()
            if spec.megatron_layer_wise == "pingpong":
                gloo_uneven_all_gather()
        with layer_wise:
            optimizer = get_megatron_optimizer(optimizer_config(spec, name), [model])
        # What Megatron-LM's OptimizerParamScheduler writes into every group at each step
        # (the demo keeps weight decay constant, so once): weight_decay = wd * wd_mult
        # (wd_mult 0 for biases and 1-D params, Megatron's standard overrides).
        for group in optimizer.param_groups:
            group["weight_decay"] = spec.weight_decay * group.get("wd_mult", 1.0)
        return optimizer

    return build


# ------------------------------------------------------------------------------ requirements
def emerging_missing(name: str) -> Callable[[], str | None]:
    """Why Megatron's emerging optimizer ``name`` cannot be built here (None: it can)."""

    def missing() -> str | None:
        if importlib.util.find_spec("emerging_optimizers") is None:
            return f"emerging-optimizers is not installed in this Python; {SETUP_PEERS}"
        try:
            import megatron.core
            from megatron.core.optimizer import emerging_optimizers as eo
        except ImportError as err:  # megatron-core < 0.19, or 0.19 on Python 3.11 without the shim
            return (
                f"megatron.core.optimizer.emerging_optimizers does not import ({err}); "
                f"{SETUP_PEERS}"
            )
        except Exception as err:  # e.g. typing.override missing on Python 3.11
            return (
                f"megatron-core with emerging-optimizers fails to import ({err!r}); {SETUP_PEERS}"
            )
        if not eo.HAVE_EMERGING_OPTIMIZERS or name not in eo._EMERGING_OPTIMIZERS:
            version = getattr(megatron.core, "__version__", "?")
            return (
                f"megatron-core {version} does not register the emerging optimizer {name!r}; "
                f"{SETUP_PEERS}"
            )
        return None

    return missing


def _nothing_missing() -> str | None:
    return None


# ------------------------------------------------------------------------------------ table
@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer of the demo: how it is built and what it needs."""

    name: str
    description: str
    build: Callable[[RunSpec, Any, int], Any]  # (spec, DDP model, micro-steps) -> optimizer
    default_lr: float
    requires: str  # what must be installed, in words
    ours: bool  # ML-FOP-SOAP package (stats, grad diagnostics, checkpoints) vs a Megatron peer
    folding_ddp: bool  # model in FoldingDistributedDataParallel (else Megatron's DDP)
    probe: Callable[[], str | None] = _nothing_missing

    def missing(self) -> str | None:
        """Why this optimizer cannot run in this Python (None when it can)."""
        return self.probe()

    @property
    def checkpoint_refusal(self) -> str | None:
        """Why the demo does not save / resume this optimizer's checkpoints (None: it does)."""
        return None if self.ours else PEER_CHECKPOINT_REASON


# Peak learning rates: one-seed sweep of 1e-3..3e-2 at 200 steps of the default model (val
# loss, before the vocabulary padding); 5e-3 was best or within noise of the best for each
# optimizer. The peers got no sweep: 5e-3 like ours. Our SOAP's update at RMS 1
# (SOAPConfig.update_rms, the default since 2026-12-07) moves the best lr down: 2e-3..3e-3 on
# the main job's grid (benchmarks/RESULTS.md), so mlfop and soap take 3e-3 (SOAPConfig.lr).
# --lr overrides.
_OURS = "mlfop_megatron with megatron-core (any supported version)"
_PEERS = "megatron-core >= 0.19 with emerging-optimizers 0.3.0 (make setup-peers)"
TABLE: dict[str, OptimizerEntry] = {
    e.name: e
    for e in (
        OptimizerEntry(
            "mlfop", "ML-FOP-SOAP: SOAP + multi-level FOP folding", build_mlfop, 3e-3, _OURS,
            ours=True, folding_ddp=True,
        ),
        OptimizerEntry(
            "soap", "our SOAP (folding off)", build_mlfop, 3e-3, _OURS,
            ours=True, folding_ddp=True,
        ),
        OptimizerEntry(
            "adamw", "AdamW through our chained optimizer", build_adamw, 5e-3, _OURS,
            ours=True, folding_ddp=False,
        ),
        OptimizerEntry(
            "megatron-soap", "Megatron 0.19's SOAP (emerging-optimizers)",
            build_megatron_emerging("soap"), 5e-3, _PEERS,
            ours=False, folding_ddp=False, probe=emerging_missing("soap"),
        ),
        OptimizerEntry(
            "megatron-muon", "Megatron 0.19's Muon (emerging-optimizers)",
            build_megatron_emerging("muon"), 5e-3, _PEERS,
            ours=False, folding_ddp=False, probe=emerging_missing("muon"),
        ),
    )
}  # fmt: skip


def entry(name: str) -> OptimizerEntry:
    """The table entry of ``name``."""
    return TABLE[name]


def available(names: tuple[str, ...] | None = None) -> tuple[list[str], dict[str, str]]:
    """(names that can run here, {name: reason} of those that cannot), in table order."""
    ok, skipped = [], {}
    for name in names or tuple(TABLE):
        reason = TABLE[name].missing()
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped
