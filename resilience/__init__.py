"""Composable resilience middleware for async message handlers."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
