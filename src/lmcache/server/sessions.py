"""Lookup sessions: what a lookup found for a request, and the locks it holds.

A session starts with a lookup and ends with `end_session`, or when its lease
TTL passes (an engine that forgot a request must not pin memory forever).

    lookup(req) ──> Session{hit_tokens, lease on every rank's hit chunks}
                    (the last hit chunk may be a partial one: ``tail_tokens``)
        retrieve(rank r, chunks) ── releases rank r's locks on those chunks
        free_lookup(start, end)  ── releases every rank's locks in the range
    end_session(req) / TTL ──> all remaining locks released, session dropped
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from lmcache.errors import BadRequestError
from lmcache.storage.chunk_store import ChunkStore
from lmcache.storage.l1 import Lease
from lmcache.types import ObjectKey

MAX_SESSIONS = 1 << 16  # open lookups held at once (each pins chunks until its TTL)

# A partial chunk that a lookup pinned after its whole chunks: (its tokens, every rank's key).
Tail = tuple[int, list[ObjectKey]]
# Finds and pins the partial chunk at a whole-chunk position (None: there is none).
TailProbe = Callable[[int], Tail | None]


@dataclass(eq=False, slots=True)
class Session:
    request_id: str
    lease: Lease
    hit_tokens: int | None
    chunk_size: int
    # Keys of the hit chunks, chunk-major: groups[i] = every rank's key for chunk i.
    groups: list[list[ObjectKey]] = field(default_factory=list)
    expires: float = 0.0
    pid: int | None = None  # the process that looked it up (None: unknown)
    # An L2 prefetch still loading more chunks into the lease (see `Sessions.poll`).
    prefetch: Future[list[list[ObjectKey]]] | None = None
    # Tokens of the last group when it is a partial chunk (0: it is whole).
    tail_tokens: int = 0
    # Looks for a partial chunk once the prefetch tells where the whole chunks end.
    tail_probe: TailProbe | None = None
    # For the metrics: what the lookup asked, and how many chunk groups L1 held by itself
    # (the groups after them, up to a partial chunk, came from L2).
    model_name: str = ""
    requested_tokens: int = 0
    l1_groups: int = 0

    def add_tail(self, tail: Tail | None) -> None:
        """Count the partial chunk found after the whole ones (pinned in the lease)."""
        if tail is not None:
            self.groups.append(tail[1])
            self.tail_tokens = tail[0]
        short = self.chunk_size - self.tail_tokens if self.tail_tokens else 0
        self.hit_tokens = len(self.groups) * self.chunk_size - short

    def hit_split(self) -> tuple[int, int, int]:
        """(tokens L1 could serve by itself, keys L1 held, keys loaded from L2). A partial
        chunk lives in L1 only; when L2 filled the chunks before it, L1 alone could not
        serve it (upstream's rule: the L2 part is everything past the L1-servable prefix)."""
        tail = 1 if self.tail_tokens else 0
        loaded = self.groups[self.l1_groups : len(self.groups) - tail]
        l2_keys = sum(len(g) for g in loaded)
        l1_keys = sum(len(g) for g in self.groups) - l2_keys
        hit = self.hit_tokens or 0
        return (self.l1_groups * self.chunk_size if loaded else hit), l1_keys, l2_keys

    def keys_in(self, start: int, end: int | None) -> Iterator[ObjectKey]:
        first = start // self.chunk_size
        last = (
            len(self.groups) if end is None else min(len(self.groups), -(-end // self.chunk_size))
        )
        for group in self.groups[first:last]:
            yield from group


class Sessions:
    def __init__(self, store: ChunkStore, chunk_size: int, ttl: float) -> None:
        self._store = store
        self._chunk_size = chunk_size
        self._ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(
        self,
        request_id: str,
        lease: Lease,
        held: list[list[ObjectKey]],
        *,
        prefetch: Future[list[list[ObjectKey]]] | None = None,
        pid: int | None = None,
        tail: Tail | None = None,
        tail_probe: TailProbe | None = None,
        model_name: str = "",
        requested_tokens: int = 0,
    ) -> Session:
        """A lookup's result: ``held`` are the chunk groups pinned in ``lease`` (every rank's
        key per chunk, from the first), then ``tail``, a partial chunk, if any; the hit is
        unknown (None) while ``prefetch`` loads more into the lease (which is why the caller
        says what was held before it ran), and ``tail_probe`` runs once it is done."""
        session = Session(
            request_id,
            lease,
            None if prefetch is not None else len(held) * self._chunk_size,
            self._chunk_size,
            list(held),
            time.monotonic() + self._ttl,
            pid,
            prefetch,
            tail_probe=tail_probe,
            model_name=model_name,
            requested_tokens=requested_tokens,
            l1_groups=len(held),
        )
        if prefetch is None:
            session.add_tail(tail)
        with self._lock:
            full = len(self._sessions) >= MAX_SESSIONS and request_id not in self._sessions
            old = None if full else self._sessions.pop(request_id, None)
            if not full:
                self._sessions[request_id] = session
        if full:
            self._store.unpin(lease)
            raise BadRequestError(
                f"too many open lookups ({MAX_SESSIONS}); end_session releases them"
            )
        if old is not None:  # a repeated lookup (e.g. after preemption) replaces the old one
            self._store.unpin(old.lease)
        return session

    def poll(self, session: Session) -> bool:
        """Take in a finished L2 prefetch (its chunks are pinned in the lease by now): the
        hit becomes known. True only for the call that resolved it."""
        job = session.prefetch
        if job is None or not job.done():
            return False
        with self._lock:
            if session.prefetch is not job:
                return False  # another poll got here first
            session.prefetch = None
            loaded = job.result() if job.exception() is None else []
            session.groups.extend(loaded)
            probe, session.tail_probe = session.tail_probe, None
        # The prefetch is done, so the whole chunks end here: a partial chunk may follow
        # (probed outside our lock: it hashes, and takes the L1's lock).
        session.add_tail(probe(len(session.groups)) if probe is not None else None)
        return True

    def get(self, request_id: str) -> Session | None:
        return self._sessions.get(request_id)

    def release(self, request_id: str, keys: list[ObjectKey] | None = None) -> None:
        session = self._sessions.get(request_id)
        if session is not None:
            self._store.unpin(session.lease, keys)

    def free_range(self, request_id: str, start: int, end: int | None) -> int:
        session = self._sessions.get(request_id)
        if session is None:
            return 0
        keys = list(session.keys_in(start, end))
        self._store.unpin(session.lease, keys)
        return len(keys)

    def end(self, request_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(request_id, None)
        if session is None:
            return False
        self._store.unpin(session.lease)
        return True

    def expire(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s.request_id for s in self._sessions.values() if s.expires < now]
        return sum(self.end(request_id) for request_id in stale)

    def pids(self) -> set[int]:
        with self._lock:
            return {s.pid for s in self._sessions.values() if s.pid}

    def end_pids(self, pids: set[int]) -> int:
        """End the sessions that the processes ``pids`` (now dead) started."""
        with self._lock:
            doomed = [s.request_id for s in self._sessions.values() if s.pid in pids]
        return sum(self.end(request_id) for request_id in doomed)

    def __len__(self) -> int:
        return len(self._sessions)

    def snapshot(self, limit: int = 100) -> list[dict[str, object]]:
        now = time.monotonic()
        with self._lock:
            items = list(self._sessions.values())[:limit]
        return [
            {
                "request_id": s.request_id,
                "hit_tokens": s.hit_tokens,
                "locked_objects": len(s.lease.objects),
                "expires_in_s": round(s.expires - now, 1),
            }
            for s in items
        ]
