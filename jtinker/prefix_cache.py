"""Keys and values of sampled sequences, kept so that later prompts which extend them skip their prefill.

A multi-turn episode's next prompt is the last prompt plus its completion plus a new message, and a
GRPO group's requests share one prompt whether or not they land in one batch. The sampler stores
each row's keys and values after decoding (``prompt + completion[:-1]``: the last token was never
fed) under the adapter snapshot that computed them, and a new prompt reuses the longest common
prefix it shares with any entry of its adapter. Causal attention makes that prefix's keys and values
independent of what followed it.

Scoring (prompt logprobs, ``compute_logprobs``) needs each prompt token's logprob as well. An entry
keeps those of its first tokens when they were computed (the prompt of a request that asked for
them, or a prefix the sampler scored once for a batch whose prompts share it), and a scoring lookup
matches only that part: the suffix past it is scored by the prefill that attends to the cache.

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
    # float32 [m <= n]: logprobs[i] = lp(tokens[i] | tokens[:i]) for 0 < i < m (m = 0: none known)
    logprobs: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    # float32 [V]: the logprob of every token after all n (kept for a prefix scored for a batch)
    next_logprobs: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        scores = self.logprobs.nbytes + (0 if self.next_logprobs is None else self.next_logprobs.nbytes)
        return self.k.nbytes + self.v.nbytes + scores

    def scored_length(self, prompt: np.ndarray) -> int:
        """How many leading positions of ``prompt`` this entry serves a scoring prefill: keys and
        values, and the logprobs of tokens ``1..n``. The token after them is fed for its logits,
        unless the entry holds the logprobs of whatever follows all of its tokens."""
        m = len(self.logprobs)
        common = common_prefix(self.tokens[:m], prompt)
        boundary = self.next_logprobs is not None and common == m == len(self.tokens) < len(prompt)
        return common if boundary else common - 1

    def prompt_logprobs(self, prompt: Sequence[int], n: int) -> np.ndarray:
        """The logprobs of ``prompt``'s tokens ``1..n`` (``n`` from :meth:`scored_length`)."""
        if n < len(self.logprobs):
            return self.logprobs[1 : n + 1]
        return np.append(self.logprobs[1:], self.next_logprobs[prompt[n]]).astype(np.float32)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The number of leading tokens two int arrays share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


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
        self.hit_tokens = 0  # prompt tokens served from the cache, all told (the sampler counts them)
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

    def lookup(
        self, adapter: Any, prompt: Sequence[int], *, scored: bool = False
    ) -> tuple[Entry, int] | None:
        """The entry that serves the most of ``prompt`` under ``adapter``, and the number ``n`` of
        leading positions whose keys and values it serves; None below :data:`MIN_HIT_TOKENS`.

        ``n`` leaves at least the last prompt token to feed (its logits pick the next token). A
        ``scored`` lookup needs the logprobs of tokens ``1..n`` too (:meth:`Entry.scored_length`)."""
        owner = owner_key(adapter)
        if owner is None or len(prompt) <= MIN_HIT_TOKENS:
            return None
        prompt = np.asarray(prompt, np.int32)
        best, best_n = None, 0
        for key in self._by_head.get(self._head(owner, prompt), ()):
            entry = self._entries[key]
            if entry.owner is not None and entry.owner() is not adapter:
                continue  # a gone adapter's entry under a reused id
            # An unscored hit feeds the last prompt token again, for the logits of the next.
            n = entry.scored_length(prompt) if scored else common_prefix(entry.tokens, prompt[:-1])
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < MIN_HIT_TOKENS:
            return None
        self._entries.move_to_end(best)
        return self._entries[best], best_n

    def insert(
        self,
        adapter: Any,
        tokens: Sequence[int],
        k: jax.Array,
        v: jax.Array,
        prompt_logprobs: np.ndarray | None = None,
        next_logprobs: np.ndarray | None = None,
    ) -> None:
        """Keeps ``tokens``' keys and values and what is known of its logprobs (see :class:`Entry`:
        ``prompt_logprobs[i]`` is token ``i + 1``'s, as a prefill's prompt logprobs have them);
        entries of the adapter that are prefixes of ``tokens`` go (the new one covers them, and keeps
        their logprobs if it has fewer), then the least recently used until the budget holds."""
        owner = owner_key(adapter)
        if owner is None or len(tokens) < MIN_HIT_TOKENS:
            return
        tokens = np.asarray(tokens, np.int32)
        logprobs = np.zeros(0, np.float32)
        if prompt_logprobs is not None:  # slot 0 (the first token has none) keeps indices = positions
            logprobs = np.concatenate([[0.0], prompt_logprobs]).astype(np.float32)
        entry = Entry(
            tokens, k, v, None if adapter is None else weakref.ref(adapter), logprobs, next_logprobs
        )
        if entry.nbytes > self.max_bytes:
            return
        head = self._head(owner, tokens)
        for other in list(self._by_head.get(head, ())):
            held = self._entries[other]
            if len(held.tokens) <= len(tokens) and (held.tokens == tokens[: len(held.tokens)]).all():
                alive = held.owner is None or held.owner() is adapter  # not a gone adapter's, same id
                if alive and len(held.logprobs) > len(entry.logprobs):
                    entry.logprobs = held.logprobs
                self._drop(other)  # the same tokens again, or fewer: this entry serves all they did
        key = (owner, tokens.tobytes())
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
