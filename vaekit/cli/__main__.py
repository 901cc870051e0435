"""`python -m vaekit.cli` (and `torchrun -m vaekit.cli`): the `vaekit` command."""

import sys

from . import main

sys.exit(main())
