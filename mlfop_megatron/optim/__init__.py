"""torch.optim front end."""

from mlfop_megatron.optim.mlfop_soap import MLFOPSOAP

__all__ = ["MLFOPSOAP"]
