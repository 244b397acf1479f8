"""``python -m ccpd.cli``: the ``ccp`` command."""
import sys

from ccpd.cli import main

sys.exit(main())
