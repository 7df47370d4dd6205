"""``python -m orchestrator`` is the ``wisestream`` command."""

from orchestrator.cli import main

raise SystemExit(main())
