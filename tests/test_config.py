"""Every invalid option raises a ValueError naming the option and the allowed range."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.config import FoldingConfig, MLFOPConfig, SOAPConfig
from mlfop_megatron.optim import MLFOPSOAP

BAD_SOAP = [
    ({"lr": -1e-3}, "lr", r"\[0, inf\)"),
    ({"lr": float("nan")}, "lr", "real number"),
    ({"lr": "0.1"}, "lr", "real number"),
    ({"betas": (1.0, 0.9)}, r"betas\[0\]", r"\[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]", r"\[0, 1\)"),
    ({"betas": (0.9,)}, "betas", "pair"),
    ({"shampoo_beta": 1.5}, "shampoo_beta", r"\[0, 1\)"),
    ({"eps": 0.0}, "eps", r"\(0, inf\)"),
    ({"eps": -1e-8}, "eps", r"\(0, inf\)"),
    ({"weight_decay": -0.1}, "weight_decay", r"\[0, inf\)"),
    ({"precondition_frequency": 0}, "precondition_frequency", ">= 1"),
    ({"precondition_frequency": 2.5}, "precondition_frequency", "integer"),
    ({"max_precond_dim": 0}, "max_precond_dim", ">= 1"),
    ({"refresh_method": "svd"}, "refresh_method", "one of"),
    ({"correct_bias": "yes"}, "correct_bias", "True or False"),
    ({"lr": float("inf")}, "lr", "finite"),
]

BAD_FOLDING = [
    ({"accumulation_steps": 0}, "accumulation_steps", ">= 1"),
    ({"accumulation_steps": 4, "boundaries": (1, 3, 2, 4)}, "boundaries", "strictly increasing"),
    ({"accumulation_steps": 4, "boundaries": (1, 2)}, "boundaries", "ending at"),
    ({"accumulation_steps": 4, "boundaries": (2, 4)}, "boundaries", "starting at 1"),
    ({"accumulation_steps": 4, "boundaries": ()}, "boundaries", "non-empty"),
    ({"accumulation_steps": 4, "boundaries": (1, 2.5, 4)}, "boundaries", "integers"),
    ({"beta_max": 0.0}, "beta_max", r"\(0, inf\)"),
    ({"fop_eps": -1.0}, "fop_eps", r"\[0, inf\)"),
    ({"parallel_tol": 1.0}, "parallel_tol", r"\[0, 1\)"),
    ({"enabled": 1}, "enabled", "True or False"),
]


@pytest.mark.parametrize("kwargs,option,allowed", BAD_SOAP)
def test_bad_soap_option(kwargs, option, allowed):
    with pytest.raises(ValueError, match=rf"'{option}' must be .*{allowed}"):
        SOAPConfig(**kwargs)


@pytest.mark.parametrize("kwargs,option,allowed", BAD_FOLDING)
def test_bad_folding_option(kwargs, option, allowed):
    with pytest.raises(ValueError, match=rf"'{option}' must be .*{allowed}"):
        FoldingConfig(**kwargs)


def test_optimizer_front_end_validates():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="'lr' must be"):
        MLFOPSOAP([p], lr=-1.0)
    with pytest.raises(ValueError, match="unknown ML-FOP-SOAP option"):
        MLFOPSOAP([p], learning_rate=1e-3)
    with pytest.raises(ValueError, match="either config"):
        MLFOPSOAP([p], config=MLFOPConfig(), lr=1e-3)
    with pytest.raises(ValueError, match="'weight_decay' must be"):
        MLFOPSOAP([{"params": [p], "weight_decay": -1.0}])


def test_defaults_follow_soap_reference_but_the_measured_six():
    """The reference's defaults but six: beta1, factor EMA, update RMS, each step, first, gated.

    Those six were chosen by measurement (benchmarks/peers.py); REFERENCE_SOAP restores them.
    """
    from mlfop_megatron.config import REFERENCE_SOAP

    cfg = SOAPConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (3e-3, (0.9, 0.95), 1e-8, 0.01)
    assert (cfg.precondition_frequency, cfg.max_precond_dim) == (1, 10000)
    assert cfg.refresh_first and not cfg.first_step_update and cfg.factor_estimator == "shampoo"
    reference = SOAPConfig(**REFERENCE_SOAP)
    assert reference.precondition_frequency == 10 and not reference.refresh_first
    assert cfg.refresh_tolerance == 0.03 and reference.refresh_tolerance == 0.0
    assert reference.betas == (0.95, 0.95) and not cfg.nesterov
    assert cfg.factor_beta == 0.8 and reference.factor_beta == 0.95
    assert cfg.update_rms == 1.0 and reference.update_rms == 0.0
    assert cfg.correct_bias and not cfg.precondition_1d


def test_folding_is_off_by_default():
    """Folding added nothing measured on the main job (benchmarks/RESULTS.md): it is opt-in.

    Every default front end (FoldingConfig, MLFOPConfig, the flat keywords of MLFOPSOAP)
    builds one level per window: plain SOAP on the mean of the micro-step gradients.
    """
    from mlfop_megatron.core.levels import LevelSchedule

    assert not FoldingConfig().enabled and not MLFOPConfig().folding.enabled
    assert not MLFOPConfig.from_kwargs(accumulation_steps=8).folding.enabled
    opt = MLFOPSOAP([torch.nn.Parameter(torch.zeros(3, 2))], accumulation_steps=8)
    assert opt.schedule.boundaries == (8,) and opt.schedule.num_folds == 0
    on = FoldingConfig(enabled=True, accumulation_steps=8)
    assert LevelSchedule.from_config(on).boundaries == (1, 2, 4, 8)
