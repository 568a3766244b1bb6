"""``python -m triode`` is the ``triode`` command."""

import sys

from .cli import main

sys.exit(main())
