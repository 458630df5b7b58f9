"""``python -m elspeth_nb``: the ``elspeth-nb`` command line."""

import sys

from elspeth_nb.cli import main

sys.exit(main())
