"""``python -m chip``: the same as the ``chip`` command (works under torchrun ``-m chip``)."""

import sys

from chip.cli import main

if __name__ == "__main__":
    sys.exit(main())
