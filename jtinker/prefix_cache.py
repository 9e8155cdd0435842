"""Keys and values of sampled sequences, kept so that later prompts which extend them skip their prefill.

A multi-turn episode's next prompt is the last prompt plus its completion plus a new message, and a
GRPO group's requests share one prompt whether or not they land in one batch. The sampler stores
each row's keys and values after decoding (``prompt + completion[:-1]``: the last token was never
fed) under the adapter snapshot that computed them, and a new prompt reuses the longest common
prefix it shares with any entry of its adapter. Causal attention makes that prefix's keys and values
independent of what followed it.

Entries are least-recently-used within a byte budget. An adapter is told apart by identity (a
sampling client's snapshot is immutable; an inflight save makes a new one), held weakly so the
cache never keeps an old adapter alive. A full fine-tune's weights are not held at all (no
weak reference to a dict): their prompts are not cached.
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

MIN_HIT_TOKENS = 16  # a shorter common prefix is recomputed: one more program is not worth it


@dataclasses.dataclass
class Entry:
    tokens: np.ndarray  # int32 [n]: the tokens at positions [0, n) whose keys and values are held
    k: jax.Array  # [L, >= n, nKV, D] (slots past n are stale)
    v: jax.Array
    owner: Any  # weakref.ref to the adapter, or None for the base model

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def owner_key(adapter: Any) -> tuple | None:
    """The cache's key for ``adapter`` (None: the base model), or None when it cannot be cached."""
    if adapter is None:
        return ("base",)
    try:
        weakref.ref(adapter)
    except TypeError:
        return None
    return ("adapter", id(adapter))


class PrefixCache:
    """LRU of :class:`Entry` by ``(owner_key, tokens)``, at most ``max_bytes`` in all.

    Entries are also indexed by their first :data:`MIN_HIT_TOKENS` tokens: only those can share
    enough of a prompt to serve it, so a lookup compares a handful of entries, not all of them.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache, all told
        self._entries: collections.OrderedDict[tuple, Entry] = collections.OrderedDict()
        self._by_head: dict[tuple, set[tuple]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _head(owner: tuple, tokens: np.ndarray) -> tuple:
        return owner, tokens[:MIN_HIT_TOKENS].tobytes()

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        head = self._head(key[0], entry.tokens)
        self._by_head[head].discard(key)
        if not self._by_head[head]:
            del self._by_head[head]

    def prune(self) -> None:
        """Drops the entries of adapters that are gone (their ids may name other adapters now)."""
        for key, entry in list(self._entries.items()):
            if entry.owner is not None and entry.owner() is None:
                self._drop(key)

    def lookup(self, adapter: Any, prompt: Sequence[int]) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with ``prompt`` under ``adapter`` and that prefix's
        length, capped at ``len(prompt) - 1`` (the last prompt token is fed again for its logits);
        None below :data:`MIN_HIT_TOKENS`."""
        owner = owner_key(adapter)
        if owner is None or len(prompt) <= MIN_HIT_TOKENS:
            return None
        prompt = np.asarray(prompt, np.int32)
        best, best_n = None, 0
        for key in self._by_head.get(self._head(owner, prompt), ()):
            entry = self._entries[key]
            if entry.owner is not None and entry.owner() is not adapter:
                continue  # a gone adapter's entry under a reused id
            m = min(len(entry.tokens), len(prompt) - 1)
            differ = np.flatnonzero(entry.tokens[:m] != prompt[:m])
            n = int(differ[0]) if len(differ) else m
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < MIN_HIT_TOKENS:
            return None
        self._entries.move_to_end(best)
        self.hit_tokens += best_n
        return self._entries[best], best_n

    def insert(self, adapter: Any, tokens: Sequence[int], k: jax.Array, v: jax.Array) -> None:
        """Keeps ``tokens``' keys and values; entries of the adapter that are prefixes of ``tokens``
        go (the new one covers them), then the least recently used until the budget holds."""
        owner = owner_key(adapter)
        if owner is None or len(tokens) < MIN_HIT_TOKENS:
            return
        tokens = np.asarray(tokens, np.int32)
        key = (owner, tokens.tobytes())
        if key in self._entries:
            self._drop(key)  # the same tokens again: this copy is as good, and it may be a new adapter's
        entry = Entry(tokens, k, v, None if adapter is None else weakref.ref(adapter))
        if entry.nbytes > self.max_bytes:
            return
        head = self._head(owner, tokens)
        for other in list(self._by_head.get(head, ())):
            held = self._entries[other].tokens
            if len(held) <= len(tokens) and (held == tokens[: len(held)]).all():
                self._drop(other)
        self._entries[key] = entry
        self._by_head.setdefault(head, set()).add(key)
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._by_head.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hit_tokens": self.hit_tokens}
