"""``python -m moerust``: the command-line interface."""

from .cli import main

raise SystemExit(main())
