"""``SelectionPolicy``: which entries of one tensor move in a step.

The mask rule is kept apart from the update rule: an optimizer subclass answers, per tensor,
with a policy (``MaskedAdam.selection_policy``), and every consumer reads the same object --
the PyTorch path, the Triton launcher and ``UpdateTelemetry``. A new rule is a new ``kind``
here, one branch in each path's selection and one row in the tests' table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .selection import ALL, KINDS, RANDOM, RANDOM_EXACT, TOPK_GRADIENT, TOPK_MOMENTUM, topk_count

_TOPK_KINDS = (TOPK_MOMENTUM, TOPK_GRADIENT)


@dataclass(frozen=True)
class SelectionPolicy:
    """How the entries that move in a step are chosen in one tensor.

    Args:
        kind: one of ``maskopt.selection.KINDS``: ``"all"`` (every entry, AdamW),
            ``"topk_momentum"`` / ``"topk_gradient"`` (the exact top-k of ``|exp_avg|`` /
            ``|grad|``, ties to the lowest flat index, NaN largest), ``"random"`` (each entry
            with probability ``alpha`` from the counter hash) or ``"random_exact"`` (exactly
            ``topk_count(n, alpha)`` entries, those with the largest hash values).
        alpha: fraction of entries that move, ``0 < alpha <= 1``; ``alpha == 1`` moves all.
        block_size: top-k kinds only: select per chunk of this many consecutive flat entries
            (None: over the whole tensor).
        seed: random kinds: the hash seed.
        counter: random kinds: the hash counter; None uses the tensor's step counter (a fresh
            draw each step), an integer keeps one draw (HalfAdam's per-round entry masks).
    """

    kind: str
    alpha: float = 1.0
    block_size: int | None = None
    seed: int = 0
    counter: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"Invalid kind: {self.kind!r}; allowed values (maskopt.selection.KINDS): {', '.join(map(repr, KINDS))}"
            )
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {self.alpha!r}; allowed: 0 < alpha <= 1")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"Invalid block_size: {self.block_size!r}; allowed: None or an integer >= 1")

    @property
    def moves_all(self) -> bool:
        """Whether every entry moves (kind ``"all"``, or ``alpha == 1`` for any kind)."""
        return self.kind == ALL or self.alpha >= 1.0

    @property
    def is_topk(self) -> bool:
        return self.kind in _TOPK_KINDS

    @property
    def is_random(self) -> bool:
        return self.kind in (RANDOM, RANDOM_EXACT)

    def count(self, n: int) -> int | None:
        """Entries that move in a tensor of ``n`` entries, or None where the hash decides it
        (kind ``"random"``: about ``alpha * n``).

        Args:
            n: the tensor's number of entries.
        """
        if n == 0 or self.moves_all:
            return n
        if self.is_topk:
            block = n if self.block_size is None else min(int(self.block_size), n)
            full, rest = divmod(n, block)
            return full * topk_count(block, self.alpha) + (topk_count(rest, self.alpha) if rest else 0)
        if self.kind == RANDOM_EXACT:
            return topk_count(n, self.alpha)
        return None

    def hash_counter(self, step: float | int) -> int:
        """The counter the random kinds hash with.

        Args:
            step: the tensor's step counter after this step's increment.
        """
        return int(step) if self.counter is None else int(self.counter)

    def __str__(self) -> str:
        if self.moves_all:
            return "all"
        extra = f", block_size={self.block_size}" if self.block_size else ""
        return f"{self.kind}(alpha={self.alpha:g}{extra})"


_SHARED: dict[tuple, SelectionPolicy] = {}


def cached_policy(
    kind: str, alpha: float = 1.0, block_size: int | None = None, seed: int = 0, counter: int | None = None
) -> SelectionPolicy:
    """A shared :class:`SelectionPolicy` (they are immutable): optimizers ask for one per
    tensor per step, and this keeps that to a dictionary lookup. (A plain dict rather than
    functools.lru_cache, which torch.compile warns about when it traces a step.)

    Args:
        kind, alpha, block_size, seed, counter: as :class:`SelectionPolicy`.
    """
    key = (kind, alpha, block_size, seed, counter)
    policy = _SHARED.get(key)
    if policy is None:
        if len(_SHARED) > 4096:
            _SHARED.clear()
        policy = _SHARED[key] = SelectionPolicy(kind, alpha, block_size, seed, counter)
    return policy
