"""`python -m fimood.cli`."""

import sys

from fimood.cli import main

sys.exit(main())
