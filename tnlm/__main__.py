"""``python -m tnlm``: the command-line interface (see :mod:`tnlm.cli`)."""

from tnlm.cli import main

raise SystemExit(main())
