"""``python -m medsam ...`` (also ``torchrun ... -m medsam train ...``): the ``medsam`` command."""

import sys

from .cli import main

sys.exit(main())
