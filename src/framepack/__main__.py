"""``python -m framepack``: the same as the ``framepack`` command."""

import sys

from .cli import main

sys.exit(main())
