"""A counter-based generator for HFT's draws.

Every draw of a plan is a pure function of its keys (seed, round, strategy, stack, category):
no global RNG state is read or advanced, and the stream does not depend on the Python
version (``random.Random``'s seeding and ``sample`` algorithms are not part of its contract).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

__all__ = ["CounterRng"]

_M64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: odd, so the counter visits all 2**64 states
_INITIAL_STATE = 0x6A09E667F3BCC908  # any fixed constant; changing it changes every plan


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN_GAMMA) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key_int(key: Any) -> int:
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return int(key) & _M64


class CounterRng:
    """Deterministic random draws keyed by a tuple of values (splitmix64 over a counter).

    Two generators built from equal keys produce equal streams, on any platform and Python
    version. To draw ``k`` distinct items of ``range(n)``::

        CounterRng("maskopt.HalfAdam", seed, round).sample(range(n), k)

    Args:
        *keys: the stream's identity, mixed in order: ``str`` keys are hashed (BLAKE2b, 8
            bytes), anything else is taken as ``int(key) mod 2**64`` (Python or numpy
            integers). Use a leading string to keep one caller's streams apart from another's.
    """

    def __init__(self, *keys: Any) -> None:
        state = _INITIAL_STATE
        for key in keys:
            state = _splitmix64(state ^ _key_int(key))
        self._state = state

    def _next(self) -> int:
        self._state = (self._state + _GOLDEN_GAMMA) & _M64
        return _splitmix64(self._state)

    def below(self, n: int) -> int:
        """A uniform integer in ``[0, n)`` (rejection sampling, so no modulo bias).

        Args:
            n: the exclusive upper bound, ``n > 0``.
        """
        if n <= 0:
            raise ValueError("below(n) needs n > 0")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next()
            if x < limit:
                return x % n

    def uniform(self) -> float:
        """A uniform float in ``[0, 1)`` with 53 random bits."""
        return (self._next() >> 11) / float(1 << 53)

    def sample(self, items: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items, uniformly, in draw order (a partial Fisher-Yates shuffle).

        Args:
            items: the population (any iterable; it is copied, never changed).
            k: how many to draw, ``0 <= k <= len(items)``.
        """
        pool = list(items)
        if not 0 <= k <= len(pool):
            raise ValueError(f"sample of {k} from {len(pool)}")
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]
