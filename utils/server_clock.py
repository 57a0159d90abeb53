"""The database server's clock, as the batch processor's leases need it (docs/architecture.md#claims-and-leases).

Leases are compared across machines: a processor whose own clock runs minutes ahead would see the
live claims of others as expired and take them. So every lease time (``claimed_at``,
``lease_expires_at``, the "expired?" comparisons) is the *server's* time: read with ``hello``
(``localTime``) and carried forward between reads on this machine's monotonic clock, which no
wall-clock skew or step affects. Each read halves the round trip (the server answered somewhere
inside it), so the estimate is off by at most half a round trip plus the monotonic clock's drift
since the last read; the processor reads again at every lease renewal.

Why not ``$$NOW`` in the queries: SecantusDB 0.7.0b3 (the test database) compares a stored date
with ``$$NOW`` wrongly inside ``$expr`` (``$gt`` and ``$lt`` both false, ``$gte`` true), and a
``lease_expires_at < now`` filter with a value keeps using the claim index.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

logger = logging.getLogger(__name__)

#: Skew between this machine and the server worth a warning (it is harmless to leases, not to people
#: reading local log times against the database's).
SKEW_WARNING_SECONDS = 5.0


class ServerClock:
    """``now()``: the server's time; :meth:`sync` reads it again (at start, and with every lease renewal)."""

    def __init__(
        self,
        read: Callable[[], Awaitable[datetime | None]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        local: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._read = read
        self._monotonic = monotonic
        self._local = local
        self._base: datetime | None = None
        self._base_at = 0.0
        #: Server time minus this machine's time at the last read (seconds), for logs.
        self.skew_seconds = 0.0
        self._warned = False

    @property
    def synced(self) -> bool:
        return self._base is not None

    async def sync(self) -> None:
        """Read the server's time. A server that does not report it (no ``hello.localTime``) leaves
        this machine's clock in charge, with a warning: keep the processors' clocks in sync then."""
        before = self._monotonic()
        server = await self._read()
        after = self._monotonic()
        if server is None:
            if not self._warned:
                logger.warning("the database server does not report its time (hello.localTime): leases use this "
                               "machine's clock; keep the clocks of all processors in sync")
                self._warned = True
            server = self._local()
        elif server.tzinfo is None:  # BSON dates are UTC; a command reply may come back naive
            server = server.replace(tzinfo=UTC)
        first = self._base is None
        self._base, self._base_at = server, (before + after) / 2
        self.skew_seconds = (server - self._local()).total_seconds() + (after - before) / 2
        if first and abs(self.skew_seconds) >= SKEW_WARNING_SECONDS:
            logger.warning("this machine's clock is %.1f s %s the database server's: leases follow the server's",
                           abs(self.skew_seconds), "behind" if self.skew_seconds > 0 else "ahead of")

    def now(self) -> datetime:
        if self._base is None:
            raise RuntimeError("ServerClock.now() before sync()")
        now = self._base + timedelta(seconds=self._monotonic() - self._base_at)
        # At BSON's millisecond precision: what is compared is what gets stored.
        return now.replace(microsecond=now.microsecond // 1000 * 1000)
