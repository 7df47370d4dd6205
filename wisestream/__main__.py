"""``python -m wisestream`` is the ``wisestream`` command."""

from wisestream.cli import main

raise SystemExit(main())
