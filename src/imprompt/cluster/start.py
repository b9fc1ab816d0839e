"""`imprompt serve --workers N`: start a local Ray cluster on loopback (or join one), deploy, serve until stopped.

A local cluster is kept on 127.0.0.1: Ray's own processes otherwise talk over the machine's other addresses even
with `_node_ip_address="127.0.0.1"`; with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` they do not. Usage reports and
the dashboard are off. On SIGTERM or Ctrl-C the application is deleted, Serve shut down and, for a local cluster,
every Ray process this one started stopped with it: `ray.shutdown()` leaves Ray 2.60's dashboard and runtime-env
agents running (they ignore SIGTERM), so the processes of the session, recorded before the shutdown, are waited for
and the ones left killed by PID. Only those: a program that serves from its own process keeps its other children.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import psutil

from ..server.app import ServerSettings

log = logging.getLogger("imprompt")
LOCAL_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray peer on 127.0.0.1 (measured)
    "RAY_USAGE_STATS_ENABLED": "0",
    # On a small, busy machine Ray's HTTP proxy took over 15 s to start, and Serve killed it as unhealthy (5 s
    # timeouts, 3 tries): give it a minute.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}
APP_NAME = "imprompt"


@dataclass
class ClusterSettings:
    generators: int = 1  # generator replicas
    encoders: int = 1  # encoder replicas
    address: str | None = None  # join this cluster (`ray start --head` printed it) instead of starting one
    models_per_worker: int = 2
    gpus_per_worker: float = 0.0  # of a generator replica
    gpus_per_encoder: float = 0.0
    max_ongoing: int = 4  # requests a replica takes at once (they queue in it, one generation at a time)
    batch_max: int | None = None  # rows one batched pipeline call of a generator replica may hold (workers.py)
    batch_wait: float = 0.0  # seconds a generator replica waits for requests to batch with (0: no batching)


def serve_cluster(engine: dict, server: ServerSettings, cluster: ClusterSettings, host: str, port: int,
                  stop: threading.Event | None = None) -> None:  # fmt: skip
    """Serve on host:port until SIGTERM / SIGINT (or `stop` is set); a second signal stops at once."""
    stop = stop or threading.Event()
    started = time.perf_counter()
    ray, session_dir = _connect(cluster.address)
    from ray import serve

    serving = False
    try:
        from .board import BOARD_NAME, NAMESPACE, JobBoard
        from .ingress import Ingress
        from .workers import WorkerSettings, deployments

        # owned by this process: it goes when this process does (and the application with it, below)
        board = ray.remote(JobBoard).options(name=BOARD_NAME, namespace=NAMESPACE, num_cpus=0).remote()  # noqa: F841
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        serving = True
        worker = WorkerSettings(engine, cluster.models_per_worker, cluster.batch_max, cluster.batch_wait)
        generators, encoders = deployments(worker, cluster)
        app = serve.deployment(Ingress, name="ingress", ray_actor_options={"num_cpus": 0}).bind(
            generators, encoders, engine, server)
        serve.run(app, name=APP_NAME, route_prefix="/")
        if threading.current_thread() is threading.main_thread():  # after Ray's own driver handlers, replacing them
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: _stop(stop))
        batching = f"batching up to {cluster.batch_wait:g} s" if cluster.batch_wait > 0 else "no batching"
        log.info("cluster ready in %.1f s: %d generator (%s) and %d encoder replica(s); serving on http://%s:%d",
                 time.perf_counter() - started, cluster.generators, batching, cluster.encoders, host, port)  # fmt: skip
        while not stop.wait(0.5):
            pass
        log.info("stopping the cluster")
    finally:
        if serving:
            serve.delete(APP_NAME)  # ours only: a joined cluster may serve other applications
            if not cluster.address:
                serve.shutdown()
        started_here = session_processes(session_dir)  # recorded while they run: they are found by parentage
        ray.shutdown()
        stop_left_over(started_here)


def session_processes(session_dir: str) -> list[psutil.Process]:
    """The processes of this process's local Ray session: the children `ray.init` started (gcs_server, raylet, the
    monitors: each names the session's folder on its command line) and all they started (Ray's agents, workers and
    Serve's actors, renamed `ray::...`). Any other child of this process (an embedding program's) is not Ray's."""
    if not session_dir:  # a joined cluster: none of its processes is this one's to stop
        return []
    roots = []
    for child in psutil.Process().children():
        try:
            if any(session_dir in argument for argument in child.cmdline()):
                roots.append(child)
        except psutil.Error:  # ended meanwhile
            continue
    found = {root.pid: root for root in roots}
    for root in roots:
        try:
            found.update((process.pid, process) for process in root.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def stop_left_over(processes: list, wait_s: float = 10.0) -> None:
    """Kill by PID what of a local Ray session outlived `ray.shutdown()`, its raylet first (it would restart its
    agents). psutil checks each process's start time, so a PID taken by another process since is left alone."""
    gone, alive = psutil.wait_procs(processes, timeout=wait_s)
    alive.sort(key=lambda p: p.name() != "raylet" if p.is_running() else True)
    for process in alive:
        try:
            name = process.name()
            process.kill()
            log.info("stopped %s (pid %d): it outlived the Ray shutdown", name, process.pid)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=wait_s)


def _stop(stop: threading.Event) -> None:
    if stop.is_set():
        raise KeyboardInterrupt  # a second signal: do not wait for a graceful stop
    stop.set()


def _connect(address: str | None):
    """Join `address` (no session of this process's own: None), or start a local cluster on loopback and check
    that Ray put its node there (its session's folder, whose processes `session_processes` finds)."""
    for name, value in LOCAL_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # before Ray starts any process: they inherit it
    import ray

    if address:
        ray.init(address=address, namespace="imprompt", logging_level=logging.WARNING)
        log.info("joined the Ray cluster at %s", address)
        return ray, None
    # "local": a new cluster even where `ray start` left one running (Ray would join that one for address=None)
    context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, namespace="imprompt",
                       logging_level=logging.WARNING)  # fmt: skip
    node = ray.util.get_node_ip_address()
    if node != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"Ray placed its node on {node}, not on loopback; refusing to serve from it")
    log.info("started a local Ray cluster on 127.0.0.1")
    return ray, context.address_info["session_dir"]
