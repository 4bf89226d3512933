"""``python -m fused_train``: the same as the ``fused-train`` console script."""

import sys

from .cli import main

sys.exit(main())
