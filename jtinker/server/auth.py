"""API keys: which keys are accepted, and the owner id each one acts as.

Keys come from ``--api-key-file`` (one per line; blank lines and ``#`` comments skipped) and from
``JTINKER_API_KEYS`` (comma-separated). The SDK only sends keys that start with ``tml-``. A key's
owner id is a hash of it, so the database never holds a key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_PREFIX = "tml-"
ENV_VAR = "JTINKER_API_KEYS"


def owner_id(key: str) -> str:
    return "owner-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def load_keys(api_key_file: str | Path | None, env: str | None = None) -> list[str]:
    """Keys from the file and from ``$JTINKER_API_KEYS``; ValueError on a key the SDK cannot send."""
    keys: list[str] = []
    if api_key_file is not None:
        for line in Path(api_key_file).expanduser().read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    env = os.environ.get(ENV_VAR, "") if env is None else env
    keys.extend(k.strip() for k in env.split(",") if k.strip())
    for key in keys:
        if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + 8:
            raise ValueError(
                f"API key {key[:8]}... must start with {KEY_PREFIX!r} and have at least 8 more characters "
                "(the tinker SDK refuses other keys)"
            )
    return list(dict.fromkeys(keys))


class KeyRing:
    """Maps an API key to its owner id; ``allow_any`` (local testing only) accepts every ``tml-`` key."""

    def __init__(self, keys: list[str], *, allow_any: bool = False):
        self._owners = {hashlib.sha256(k.encode()).digest(): owner_id(k) for k in keys}
        self.allow_any = allow_any

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, key: str) -> str | None:
        digest = hashlib.sha256(key.encode()).digest()
        for known, owner in self._owners.items():  # constant-time comparison per key
            if hmac.compare_digest(known, digest):
                return owner
        if self.allow_any and key.startswith(KEY_PREFIX):
            return owner_id(key)
        return None
