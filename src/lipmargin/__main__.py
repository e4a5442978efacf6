"""``python -m lipmargin`` (also what ``torchrun -m lipmargin`` runs)."""

import sys

from .cli import main

sys.exit(main())
