"""Compatibility import: the contract suite ships in the package as :mod:`abe.testing`."""

from __future__ import annotations

from abe.testing import BackendContract

__all__ = ["BackendContract"]
