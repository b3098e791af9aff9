"""What each peer may ask: the server half of the threat model (README, "Threat model").

    request                                      NONE     REMOTE     LOCAL
    ping                                          yes      yes        yes (+ L1 pool name, seal)
    register shared memory, prepare_*, clear,      -        -         yes
    poll_kv_events (every tenant's keys)
    register worker_copy, lookups, store/retrieve  -       yes        yes
    anything naming a GPU ID                       -       owner only owner only

A registration belongs to the owner that made it (a uid for local peers, a key for
remote ones): no other owner can replace, unregister or act as it. Remote peers'
request ids live in their own scope, so they cannot end or free other peers' lookups.
"""

from __future__ import annotations

import msgspec

from lmcache.protocol.messages import (
    Clear,
    Ping,
    PollKVEvents,
    PrepareRetrieve,
    PrepareStore,
    RegisterKV,
    Request,
    ShmMemory,
)
from lmcache.server.registry import EngineRegistry
from lmcache.transport.peers import Peer, Trust

_LOCAL_ONLY = (PrepareStore, PrepareRetrieve, Clear, PollKVEvents)

UNTRUSTED_HINT = (
    "this connection is not authenticated: engines of the server's uid on this host "
    "connect through its local endpoint (the client switches by itself), engines on other "
    'hosts need a CurveZMQ key (README, "Threat model")'
)


class AccessPolicy:
    def __init__(self, registry: EngineRegistry) -> None:
        self._registry = registry

    def check(self, req: Request, peer: Peer) -> str | None:
        """Why ``peer`` may not send ``req`` (None: it may)."""
        if isinstance(req, Ping):
            return None  # anyone (only an owner's pings keep its engine alive: registry.touch)
        op = req.__struct_config__.tag
        if peer.trust is Trust.NONE:
            return f"{op} refused for {peer.label}: {UNTRUSTED_HINT}"
        if peer.trust is Trust.REMOTE and (
            isinstance(req, _LOCAL_ONLY)
            or (isinstance(req, RegisterKV) and isinstance(req.memory, ShmMemory))
        ):
            if isinstance(req, PollKVEvents):
                return f"{op} names every tenant's keys: local peers only; {peer.label} is remote"
            return f"{op} needs shared memory with the server; {peer.label} is remote"
        return self._owner_problem(req, peer)

    def _owner_problem(self, req: Request, peer: Peer) -> str | None:
        instance_id = getattr(req, "instance_id", None)
        if instance_id is None:
            return None
        engine = self._registry.peek(instance_id)
        if engine is None or engine.owner == peer.owner:
            return None
        return (
            f"GPU ID {instance_id} was registered by another client; {peer.label} may not "
            f"{req.__struct_config__.tag} it"
        )

    @staticmethod
    def scoped(req: Request, peer: Peer) -> Request:
        """A remote peer's request ids, in that peer's own scope."""
        if peer.trust is not Trust.REMOTE:
            return req
        request_id = getattr(req, "request_id", None)
        if request_id is None:
            return req
        return msgspec.structs.replace(req, request_id=f"{peer.owner}|{request_id}")
