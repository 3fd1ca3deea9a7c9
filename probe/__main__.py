"""``python -m probe`` (and ``torchrun ... -m probe -- COMMAND ...``): the ``probe`` command. A
leading ``--`` is dropped: it keeps torchrun's own option parser off the command's flags (its
prefix matching takes ``--n`` for one of its options)."""
import sys

from probe.cli import main

argv = sys.argv[1:]
sys.exit(main(argv[1:] if argv[:1] == ["--"] else argv))
