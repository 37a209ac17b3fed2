"""``python -m fastft.doctor``: the same as the ``fastft-doctor`` command."""
import sys

from .cli import main

sys.exit(main())
