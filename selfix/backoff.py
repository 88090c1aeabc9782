"""Pure retry-delay policy, shared by the spool's retries and the network clients."""

from __future__ import annotations

import random


def compute_backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1 = first retry): full-jitter exponential, capped.

    Full jitter (uniform in [delay/2, delay]) keeps a fleet that failed together from retrying together while
    still guaranteeing at least half the nominal delay.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    nominal = cap if attempt > 64 else min(cap, base * (2 ** (attempt - 1)))
    draw = rng.random() if rng is not None else random.random()
    return float(nominal / 2 + draw * nominal / 2)
