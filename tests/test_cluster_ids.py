"""Cluster job ids, without starting Ray: two ingress replicas (or one restarted) report to one job board, keyed by
job id. Each ingress's `ClusterJobs` runs requests here as the app runs them, with stand-ins for Ray's handles that
call a real `JobBoard` and a generator that reports to it as a worker does."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from conftest import request

pytest.importorskip("ray.serve", reason="the cluster extra is not installed: pip install 'imprompt[cluster]'")

from imprompt import Engine  # noqa: E402
from imprompt.cluster.board import JobBoard  # noqa: E402
from imprompt.cluster.ingress import ClusterJobs  # noqa: E402
from imprompt.request import parse_request  # noqa: E402


class Answer:
    """What `handle.method.remote(...)` returns: awaitable, and the call has already run (the ingress does not
    await every call it makes to the board)."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        return self.value
        yield  # noqa: makes this a generator: awaiting it returns `value` at once


class Board:
    """The board actor's handle: each method's `.remote` runs the real board's method."""

    def __init__(self, board: JobBoard):
        self.board = board

    def __getattr__(self, name):
        method = getattr(self.board, name)
        return SimpleNamespace(remote=lambda *args: Answer(method(*args)))


class Generators:
    """The generator deployment: reports to the board as `workers.py` does (started, then one step per call); the
    first job it gets waits for `release` before its step, so other jobs can run meanwhile."""

    def __init__(self, board: JobBoard):
        self.board, self.jobs, self.release = board, [], asyncio.Event()

    def options(self, multiplexed_model_id):
        return self

    @property
    def warm(self):
        return SimpleNamespace(remote=lambda *args: Answer(None))

    @property
    def generate(self):
        return SimpleNamespace(remote=self._generate)

    async def _generate(self, payload, iterations, embeddings, job):
        self.jobs.append(job)
        first = len(self.jobs) == 1
        assert self.board.started(job, "generator-a", iterations) is False
        if first:
            await self.release.wait()
        stop = self.board.step(job, 1, payload["steps"], 0)
        return [SimpleNamespace(info={"events": [], "job": job, "told_to_stop": stop})]


async def never_gone() -> bool:
    return False


def test_two_ingress_replicas_never_mix_their_jobs_on_the_board(pack):
    """Two ingress replicas (or a restarted one) start their ids afresh: a job of one must not take the board
    entry of a running job of the other, whose ending would then stop the running one."""
    board = JobBoard()
    generators = Generators(board)
    replicas = [ClusterJobs(Engine(pack), encoders=None, generators=generators, board=Board(board), max_queue=4)
                for _ in range(2)]  # fmt: skip

    async def scenario():
        running = asyncio.ensure_future(replicas[0].run_async(parse_request(request()), 1, never_gone))
        for _ in range(1000):  # bounded: the plan runs in a thread
            if generators.jobs:
                break
            await asyncio.sleep(0.01)
        assert board.progress()["state"]["job_count"] == 1
        other = await replicas[1].run_async(parse_request(request(seed=2)), 1, never_gone)
        assert board.progress()["state"]["job_count"] == 1, "the other replica's job ended the running one"
        generators.release.set()
        return await running, other

    (first,), (second,) = asyncio.run(scenario())
    assert first.info["job"] != second.info["job"]
    assert first.info["told_to_stop"] is False
    assert board.progress()["state"]["job_count"] == 0  # both ended, nothing lingers


def test_a_job_id_is_new_for_every_job_and_every_ingress(pack):
    """Ids are unique across ingress instances and jobs, and what A1111's progress route shows names the job."""
    board = JobBoard()
    generators = Generators(board)
    generators.release.set()
    seen = []
    for _ in range(3):  # three ingress processes, one after another (restarts)
        jobs = ClusterJobs(Engine(pack), encoders=None, generators=generators, board=Board(board), max_queue=4)
        for seed in (1, 2):
            (result,) = asyncio.run(jobs.run_async(parse_request(request(seed=seed)), 1, never_gone))
            seen.append(result.info["job"])
    assert len(set(seen)) == len(seen) == 6, seen
    board.submit(seen[0], [])
    board.started(seen[0], "generator-a", 1)
    assert board.progress()["state"]["job"] == f"job {seen[0]}"
