"""Launch helpers: job planning (``mlfop-plan``), preemption handling and stop signals."""
