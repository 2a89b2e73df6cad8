"""The backend contract under its published names."""

from __future__ import annotations

from abe.types import MessageQueueBackendProtocol

__all__ = ["MessageQueueBackend", "MessageQueueBackendProtocol", "QueueBackend"]

MessageQueueBackend = MessageQueueBackendProtocol
"""Preferred name of the message-queue backend protocol."""

QueueBackend = MessageQueueBackend
"""Legacy name kept for providers written against earlier releases."""
