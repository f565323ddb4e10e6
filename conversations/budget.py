"""The frame budget of one socket (docs/protocol.md, Limits): a token bucket
checked before a frame is even decoded, so a flood costs a subtraction per
frame, never a query. Each socket has its own: the frames of one socket
are what one process has to work through, whoever the user is."""

import time
from collections.abc import Callable


class FrameBudget:
    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.refused = 0  # in a row, since the last frame served

    def take(self) -> float:
        """0 when the frame may be served (it is counted); else the seconds
        until one may be."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused = 0
            return 0.0
        self.refused += 1
        return (1 - self.tokens) / self.rate

    @property
    def overrun(self) -> bool:
        """Refused a whole burst's worth in a row: the client is not
        listening to rate_limited."""
        return self.refused > self.burst
