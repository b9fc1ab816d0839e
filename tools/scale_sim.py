"""How a cluster of generator replicas fares under a request mix: a small event simulation of Ray Serve's
multiplexed routing (docs/scale-out.md).

The routing rules are Ray Serve 2.60's (`ray/serve/_private/request_router/request_router.py`,
`apply_multiplex_routing`, with the power-of-two choice of `pow_2_router.py`): a request goes to a replica that
reports its model id and has room (fewer than `max_ongoing` requests); if none reports it, to one of the replicas
with the fewest models; if the replicas that report it are full, first to the fewest-models ones, then to any with
room. Each replica keeps at most `models_per_worker` models, least recently used out (`@serve.multiplexed`).
imprompt's ingress adds one rule (`cluster/ingress.py`): the first request for an id no worker has answered for
goes alone, the others for that id wait for it.

Compared, on the same request stream: `ray` (the rules above), `ray+gate` (with imprompt's rule: what imprompt
runs), and `random` (no multiplexing: the power-of-two choice by queue length alone, as a deployment without model
ids routes). Printed: loads per 1,000 requests, the share of requests that found their model loaded, latency.

    python -m tools.scale_sim --gpus 8 --pipelines 20 --rate 3
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Replica:
    index: int
    capacity: int  # models it keeps
    models: OrderedDict = field(default_factory=OrderedDict)  # id -> None, least recently used first
    ongoing: int = 0
    free_at: float = 0.0  # one generation at a time: requests queue in the replica
    loads: int = 0

    def holds(self, model: int) -> bool:
        return model in self.models

    def use(self, model: int) -> bool:
        """Returns whether the model had to be loaded."""
        if model in self.models:
            self.models.move_to_end(model)
            return False
        if len(self.models) >= self.capacity:
            self.models.popitem(last=False)
        self.models[model] = None
        self.loads += 1
        return True


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1 / (k**s) for k in range(1, n + 1)]
    total = sum(weights)
    return [w / total for w in weights]


def pick_two(candidates: list[Replica], rng: random.Random) -> Replica:
    """Power of two choices by queue length (Ray Serve's default router)."""
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return a if a.ongoing <= b.ongoing else b


def route(model: int, replicas: list[Replica], policy: str, max_ongoing: int, rng: random.Random) -> Replica | None:
    room = [r for r in replicas if r.ongoing < max_ongoing]
    if not room:
        return None
    if policy == "random":
        return pick_two(room, rng)
    holders = [r for r in room if r.holds(model)]
    if holders:
        return pick_two(holders, rng)
    fewest = min(len(r.models) for r in room)
    return pick_two([r for r in room if len(r.models) == fewest], rng)


def simulate(policy: str, args, seed: int) -> dict:
    rng = random.Random(seed)
    weights = zipf_weights(args.pipelines, args.zipf)
    replicas = [Replica(i, args.models_per_worker) for i in range(args.gpus)]
    events: list = []  # (time, order, kind, payload)
    order = 0
    now = 0.0
    for _ in range(args.requests):
        now += rng.expovariate(args.rate)
        model = rng.choices(range(args.pipelines), weights)[0]
        heapq.heappush(events, (now, order, "arrive", model))
        order += 1
    waiting: list = []  # requests no replica had room for (or held back by the gate), in arrival order
    first_running: set[int] = set()
    known: set[int] = set()
    latencies, hits, served = [], 0, 0

    def start(arrived: float, model: int, at: float) -> bool:
        nonlocal order, hits, served
        gated = policy == "ray+gate" and model not in known
        if gated and model in first_running:
            return False  # its first request runs: wait for it
        replica = route(model, replicas, policy, args.max_ongoing, rng)
        if replica is None:
            return False
        if gated:
            first_running.add(model)
        loaded = replica.use(model)
        hits += not loaded
        served += 1
        replica.ongoing += 1
        begin = max(at, replica.free_at)
        replica.free_at = begin + (args.load_s if loaded else 0.0) + args.generate_s
        heapq.heappush(events, (replica.free_at, order, "done", (replica, model, arrived)))
        order += 1
        return True

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            if not start(now, payload, now):
                waiting.append((now, payload))
            continue
        replica, model, arrived = payload
        replica.ongoing -= 1
        latencies.append(now - arrived)
        if policy == "ray+gate" and model in first_running:
            first_running.discard(model)
            known.add(model)
        still = []
        for arrived_w, model_w in waiting:  # bounded: each waiting request is tried once per completion
            if not start(arrived_w, model_w, now):
                still.append((arrived_w, model_w))
        waiting = still
    latencies.sort()
    loads = sum(r.loads for r in replicas)
    return {
        "policy": policy,
        "loads_per_1000": round(1000 * loads / args.requests, 1),
        "hit_rate": round(hits / served, 3),
        "p50_s": round(latencies[len(latencies) // 2], 2),
        "p95_s": round(latencies[int(len(latencies) * 0.95)], 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="generator replicas, one per GPU")
    parser.add_argument("--pipelines", type=int, default=20, help="base models requested")
    parser.add_argument("--models-per-worker", type=int, default=3, help="pipelines a replica keeps (GPU memory)")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--generate-s", type=float, default=2.0, help="seconds per generation (SDXL, 30 steps, GPU)")
    parser.add_argument("--load-s", type=float, default=6.0, help="seconds to load a pipeline from disk")
    parser.add_argument("--max-ongoing", type=int, default=4, help="requests a replica takes at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.gpus} replicas x {args.models_per_worker} pipelines, {args.pipelines} pipelines (Zipf {args.zipf}), "
          f"{args.rate}/s, {args.generate_s} s per image, {args.load_s} s per load, {args.requests} requests")
    print("| routing | loads per 1,000 requests | model already loaded | p50 latency | p95 latency |")
    print("|---|---:|---:|---:|---:|")
    for policy in ("random", "ray", "ray+gate"):
        r = simulate(policy, args, args.seed)
        print(f"| {policy} | {r['loads_per_1000']} | {r['hit_rate']:.1%} | {r['p50_s']} s | {r['p95_s']} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
