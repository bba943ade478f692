"""``python -m maas`` is the ``maas`` command, for environments where its script is not on PATH."""

import sys

from maas.cli import main

sys.exit(main())
