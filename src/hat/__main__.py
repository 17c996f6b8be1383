"""``python -m hat``: the same as the ``hat`` command."""

import sys

from hat.cli import main

sys.exit(main())
