"""``python -m mlfop_megatron.launch.plan``: the ``mlfop-plan`` command."""

import sys

from mlfop_megatron.launch.plan.cli import main

sys.exit(main())
