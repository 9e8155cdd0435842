"""The SDK's exception names, so that ``except tinker.NotFoundError`` works in process too.

Bad arguments stay ``ValueError`` everywhere in jtinker (the message names the field); these classes
cover what a script written for the SDK catches by name. Each also derives from the built-in error a
Python caller would expect, so existing ``except FileNotFoundError`` code keeps working.
"""

from __future__ import annotations


class TinkerError(Exception):
    """Base of every error the Tinker API raises by name."""


class APIError(TinkerError):
    """A request the API refused."""


class NotFoundError(APIError, FileNotFoundError):
    """No such training run or checkpoint (HTTP 404 over the wire)."""
