"""`python -m flatminima`: the command line (see :mod:`flatminima.cli`)."""

import sys

from .cli import main

sys.exit(main())
