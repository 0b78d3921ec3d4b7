"""``python -m seqpar.launcher`` is the ``seqpar`` command."""

import sys

from seqpar.launcher.cli import main

sys.exit(main())
