"""Retry delays after failures: doubling, capped, with jitter so many
clients do not retry in step."""

from __future__ import annotations

import secrets


class Backoff:
    """Exponential backoff with jitter, for retries after failures."""

    def __init__(self, first: float = 0.1, cap: float = 5.0):
        self.first, self.cap = first, cap
        self.current = first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.cap, self.current * 2)
        # Jitter spreads many clients' retries; never past the cap.
        return min(self.cap, delay * (0.8 + 0.4 * secrets.randbelow(1000) / 1000))

    def reset(self) -> None:
        self.current = self.first
