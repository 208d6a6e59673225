"""What a purge did, shared by the verdict store and the admin endpoint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PurgeResult:
    purged: int  # entries removed here (and in Redis, with shared state)
    fleet: bool  # every replica was told (shared state reachable)
    shared: bool  # shared state is configured
