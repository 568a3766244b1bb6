"""``python -m benchmarks [WORKLOAD]... [--quick] [--json FILE]``: the same as ``triode bench``."""

import sys

from triode.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
