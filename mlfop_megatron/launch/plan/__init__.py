"""``mlfop-plan``: size an ML-FOP-SOAP Megatron job before submitting it (no torch, no GPU).

:mod:`.model` computes a plan (PlanConfig -> Plan), :mod:`.report` formats it, :mod:`.cli` is
the command line.
"""
