"""``python -m resilience``: the same as the ``resilience`` command."""

from __future__ import annotations

from resilience.cli import main

raise SystemExit(main())
