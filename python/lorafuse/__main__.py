"""``python -m lorafuse ...``: the ``lorafuse`` command (see :mod:`lorafuse.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
