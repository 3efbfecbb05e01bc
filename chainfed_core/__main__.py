"""``python -m chainfed_core --out runs/demo section.field=value ...``: see :mod:`chainfed_core.cli`."""

import sys

from .cli import main

sys.exit(main())
