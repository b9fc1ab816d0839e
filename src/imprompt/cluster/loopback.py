"""Keep a local cluster's Serve replicas listening on loopback only.

Ray Serve 2.60 starts each replica's inter-deployment gRPC server on `[::]:0`, every address of the machine
(`ray/serve/_private/replica.py`, `_on_initialized`), with no setting to change it. Its peers reach it at the node's
address, so on a node whose address is 127.0.0.1 binding 127.0.0.1 serves them all and opens nothing else. imprompt
goes beyond Ray here: each replica, in its constructor (which Serve runs before it starts that server), wraps the
function Serve calls so that `[::]` becomes 127.0.0.1 — only on a loopback node; on a node of a real cluster, peers
on other machines need the listener, and nothing is changed. The cluster test checks every listening socket of a
local cluster.
"""

from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger("imprompt")
LOOPBACK = "127.0.0.1"


def keep_replica_on_loopback(node_address: str) -> bool:
    """In a Serve replica: make its gRPC server bind 127.0.0.1 instead of `[::]` when the node is on loopback.
    Returns whether it did."""
    if node_address != LOOPBACK:
        return False
    replica = importlib.import_module("ray.serve._private.replica")  # Ray's internals: pinned to 2.60 by the extra
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "imprompt_loopback", False):
        return True

    @functools.wraps(bind)
    def bind_on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return bind(server, address)

    bind_on_loopback.imprompt_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback
    log.info("this replica's gRPC server will listen on %s only (the node is on loopback)", LOOPBACK)
    return True
