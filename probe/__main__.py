"""``python -m probe`` (and ``torchrun ... -m probe train ...``): the ``probe`` command."""
import sys

from probe.cli import main

sys.exit(main())
