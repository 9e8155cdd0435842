"""The SDK's exception names, so that ``except tinker.BadRequestError`` (or any other) works in
process too.

Bad arguments stay ``ValueError`` everywhere in jtinker (the message names the field); these classes
cover what a script written for the SDK catches by name, with its attributes (``message``, ``body``,
``status_code``; ``request_id`` and ``category`` on :class:`RequestFailedError`). In process only
:class:`NotFoundError` is raised; it also derives from ``FileNotFoundError``, so existing
``except FileNotFoundError`` code keeps working.
"""

from __future__ import annotations

from typing import Any


class TinkerError(Exception):
    """Base of every error the Tinker API raises by name."""


class APIError(TinkerError):
    """A request the API refused. ``request`` is the HTTP request, None in process."""

    def __init__(self, message: str, request: Any = None, *, body: object | None = None):
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIResponseValidationError(APIError):
    """A response that does not match the API's schema."""


class APIStatusError(APIError):
    """An HTTP 4xx or 5xx answer; each status has its subclass below."""

    status_code: int

    def __init__(self, message: str, response: Any = None, body: object | None = None):
        super().__init__(message, getattr(response, "request", None), body=body)
        self.response = response
        self.status_code = getattr(response, "status_code", getattr(type(self), "status_code", 500))


class APIConnectionError(APIError):
    """The server could not be reached."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class BillingError(APIStatusError):
    status_code = 402


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError, FileNotFoundError):
    """No such training run or checkpoint (HTTP 404 over the wire)."""

    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    status_code = 429


class InternalServerError(APIStatusError):
    """HTTP 500 and above."""


class RequestFailedError(TinkerError):
    """A request that was accepted, then failed (``category``: ``"user"``, ``"server"`` or
    ``"unknown"``)."""

    def __init__(self, message: str, request_id: str = "", category: str = "unknown"):
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category


class ExperimentalWarning(FutureWarning):
    """Emitted by an API that may change in any release (the SDK's name, for warning filters)."""
