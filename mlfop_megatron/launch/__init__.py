"""Launch helpers: job planning (``mlfop-plan``) before submitting a Megatron run."""
