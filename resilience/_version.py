"""The package version (a leaf module, so any module can read it without importing the package's
front door)."""

from __future__ import annotations

__version__ = "0.1.0"
