"""``python -m merging``: see :mod:`merging.cli`."""

from merging.cli import main

raise SystemExit(main())
