"""``python -m prunequant``: the command line (the same as the ``prunequant`` console script)."""

import sys

from .cli import main

sys.exit(main())
