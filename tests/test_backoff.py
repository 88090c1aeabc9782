"""selfix.backoff: jittered exponential delay."""

from __future__ import annotations

import random

import pytest

from selfix.backoff import compute_backoff


@pytest.mark.parametrize("attempt", range(1, 12))
def test_delay_lies_within_half_and_whole_nominal(attempt: int) -> None:
    base, cap = 0.5, 30.0
    nominal = min(cap, base * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    for _ in range(200):
        delay = compute_backoff(attempt, base, cap, rng)
        assert nominal / 2 <= delay <= nominal


def test_nominal_doubles_per_attempt() -> None:
    class Fixed(random.Random):
        def random(self) -> float:
            return 1.0  # the top of the jitter range: the nominal delay itself

    assert [compute_backoff(a, 1.0, 1000.0, Fixed()) for a in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    zero = random.Random()
    zero.random = lambda: 0.0  # type: ignore[method-assign]
    assert compute_backoff(4, 1.0, 1000.0, zero) == 4.0  # bottom of the range: half the nominal


def test_delay_is_capped() -> None:
    rng = random.Random(0)
    delays = [compute_backoff(a, 2.0, 10.0, rng) for a in range(1, 40)]
    assert max(delays) <= 10.0
    assert min(delays[5:]) >= 5.0  # at the cap, at least half the cap


def test_zero_base_gives_zero_delay() -> None:
    assert compute_backoff(3, 0.0, 120.0, random.Random(1)) == 0.0


@pytest.mark.parametrize("attempt", [0, -1, -100])
def test_attempt_below_one_is_refused(attempt: int) -> None:
    with pytest.raises(ValueError):
        compute_backoff(attempt, 1.0, 10.0, random.Random(0))


def test_deterministic_with_a_seeded_random() -> None:
    a = [compute_backoff(n, 0.2, 5.0, random.Random(42)) for n in range(1, 10)]
    b = [compute_backoff(n, 0.2, 5.0, random.Random(42)) for n in range(1, 10)]
    assert a == b
    c = [compute_backoff(n, 0.2, 5.0, random.Random(43)) for n in range(1, 10)]
    assert a != c


def test_jitter_spreads_a_fleet() -> None:
    delays = {round(compute_backoff(5, 1.0, 60.0), 6) for _ in range(50)}
    assert len(delays) > 10  # without an rng: the module's random, different every call


def test_returns_float() -> None:
    assert isinstance(compute_backoff(1, 1, 10, random.Random(0)), float)


def test_huge_attempt_is_capped_not_an_overflow() -> None:
    delay = compute_backoff(2000, 2.0, 120.0, random.Random(0))
    assert 60.0 <= delay <= 120.0
