"""``python -m medsam.cli ...``: the ``medsam`` command."""

import sys

from . import main

sys.exit(main())
