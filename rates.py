"""
Rates and their 95% intervals, for every evaluation's tables and JSON. A rate over a few dozen
behaviours is uncertain by several points, and two runs are only told apart by more than that.

Wilson's score interval is used rather than p +- 1.96 * sqrt(p(1 - p) / n): at an ASR of 0 or 1,
which circuit breakers often reach, that normal interval has zero width; Wilson's never does, and it
stays inside [0, 1].
"""

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int) -> tuple[float, float] | None:
    """The 95% Wilson score interval (low, high) of successes / n, to 4 decimals; None when n is 0."""
    if n == 0:
        return None
    p, z2 = successes / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def rate_text(successes: int, n: int) -> str:
    """The rate, its counts and its interval: '0.250 (5/20) [0.112, 0.469]'; 'n/a (0/0)' when n is 0."""
    interval = wilson(successes, n)
    if interval is None:
        return "n/a (0/0)"
    return f"{successes / n:.3f} ({successes}/{n}) [{interval[0]:.3f}, {interval[1]:.3f}]"


def best_of_k(successes: list[bool], k: int) -> list[bool]:
    """Per-sample successes, k per prompt in order (attacks.each_sample) -> one per prompt: whether any of
    its k samples succeeded, as an attacker who may try k times and keep the worst answer counts."""
    if k < 1 or len(successes) % k:
        raise ValueError(f"{len(successes)} samples cannot be split into prompts of {k}")
    return [any(successes[i:i + k]) for i in range(0, len(successes), k)]


def sampled_rates(successes: list[bool], k: int) -> dict:
    """{"per_sample": {...}, "best_of_k": {...}}, each {"rate", "successes", "n", "ci95"}: the share of all
    samples that succeeded, and of prompts with at least one success among their k. The per-sample
    interval treats the samples as independent; k answers to one prompt are not, so it is too narrow
    when k > 1, and the best-of-k one (over prompts) is the one to trust."""
    def entry(hits):
        return {"rate": sum(hits) / len(hits) if hits else None, "successes": sum(hits), "n": len(hits),
                "ci95": wilson(sum(hits), len(hits))}
    return {"per_sample": entry(list(successes)), "best_of_k": entry(best_of_k(successes, k))}
