"""The job queue's batching: which waiting jobs run together as one `generate_batch` call, and that each keeps its
own progress, interrupt, result and error (a recording fake engine), then the real server end to end."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from imprompt.errors import InterruptedRunError, RequestError
from imprompt.request import GenerateRequest
from imprompt.server.jobs import JobQueue, default_batch_max

GiB = 2**30


class FakeEngine:
    """Records every call. A prompt's first word sets its batch key ("alone": None); "refuse" and "crash" fail; in
    a batch, a prompt with "split" runs as a call of its own after the merged rows (as the real engine runs a
    request whose call cannot merge); `batch_raises`: the merged call raises it after its steps. A call holds at a step until its event in `holds` ((call, step) -> event)
    is set, so tests can look at (and interrupt) what runs: by default the first call at step 1 until `gate`."""

    def __init__(self, hold: bool = False):
        self.calls: list[tuple[str, list[str]]] = []
        self.keys_asked: list[str] = []
        self.flag = threading.Event()  # the engine's own interrupt
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.holds = {(1, 1): self.gate}
        self.device = torch.device("cpu")
        self.batch_raises: BaseException | None = None

    def batch_key(self, request):
        self.keys_asked.append(request.prompt)
        word = request.prompt.split()[0]
        return None if word == "alone" else ("key", word)

    def interrupt(self):
        self.flag.set()

    @property
    def interrupt_requested(self):
        return self.flag.is_set()

    def _hold(self, call: int, step: int) -> None:
        if (call, step) in self.holds:
            assert self.holds[call, step].wait(30)

    def _run(self, request, on_step, stopped, call: int = 1, batch: dict | None = None) -> SimpleNamespace:
        if request.prompt.endswith("refuse"):
            raise RequestError(f"refused: {request.prompt}")
        if request.prompt.endswith("crash"):
            raise RuntimeError(f"fault: {request.prompt}")
        interrupted = False
        for step in range(1, request.steps + 1):
            on_step(step, request.steps)
            self._hold(call, step)
            if stopped():
                interrupted = True
                break
        return result(request, interrupted, batch)

    def generate(self, request, on_step=None):
        self.flag.clear()  # as the real engine: each generate starts uninterrupted
        self.calls.append(("generate", [request.prompt]))
        return self._run(request, on_step, self.flag.is_set)

    def generate_batch(self, requests, on_steps=None, interrupts=None):
        self.calls.append(("batch", [r.prompt for r in requests]))
        outcomes: list = [None] * len(requests)
        running, split = {}, []
        for i, request in enumerate(requests):  # refusals come before any step, as a plan's would
            if request.prompt.endswith(("refuse", "crash")):
                try:
                    self._run(request, on_steps[i], interrupts[i].is_set)
                except Exception as exc:
                    outcomes[i] = exc
            elif "split" in request.prompt:
                split.append(i)
            else:
                running[i] = request
        calls = iter(range(1, len(requests) + 1))
        if running:
            call, stopped_at = next(calls), {}
            for step in range(1, max(r.steps for r in running.values()) + 1):  # the rows step together
                for i, request in running.items():
                    if i not in stopped_at and step <= request.steps:
                        on_steps[i](step, request.steps)
                self._hold(call, step)
                for i in running:
                    if i not in stopped_at and interrupts[i].is_set():
                        stopped_at[i] = step
            if self.batch_raises is not None:  # the merged call fails after its steps (at its decode, say)
                raise self.batch_raises
            batch = {"size": len(running), "requests": len(running), "call": call}
            for i, request in running.items():
                outcomes[i] = result(request, i in stopped_at, batch)
        for i in split:
            call = next(calls)
            outcomes[i] = self._run(requests[i], on_steps[i], interrupts[i].is_set, call,
                                    {"size": 1, "requests": 1, "call": call})  # fmt: skip
        return outcomes


def result(request, interrupted: bool, batch: dict | None) -> SimpleNamespace:
    info = {"interrupted": interrupted, "events": [], "ip_adapters": [], "prompt": request.prompt, "seed": request.seed}
    return SimpleNamespace(info=info if batch is None else {**info, "batch": batch})


def req(prompt: str, seed: int = 1, steps: int = 3, batch_size: int = 1, size: int = 64) -> GenerateRequest:
    return GenerateRequest(model="m", prompt=prompt, seed=seed, steps=steps, width=size, height=size,
                           batch_size=batch_size)  # fmt: skip


def wait_until(condition, seconds: float = 20, what: str = "condition"):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"{what} not reached in {seconds} s")
        time.sleep(0.005)


def finish(*jobs, seconds: float = 20):
    for job in jobs:
        assert job.done.wait(seconds), f"job {job.id} did not finish"


def blocked_queue(**settings) -> tuple[FakeEngine, JobQueue]:
    """A queue whose worker is held inside a lone job ("alone blocker"), so the jobs submitted next all wait."""
    engine = FakeEngine(hold=True)
    queue = JobQueue(engine, max_queue=32, **settings)
    blocker = queue.submit(req("alone blocker"))
    wait_until(lambda: queue.current is blocker and blocker.step == 1, what="the blocker running")
    return engine, queue


def release(engine: FakeEngine, queue: JobQueue) -> None:
    engine.gate.set()


# --------------------------------------------------------------------------------------------- who runs together


def test_equal_keys_submitted_within_the_wait_run_as_one_call():
    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_max=4, batch_wait=0.6)
    first = queue.submit(req("cat one", seed=1))
    time.sleep(0.2)  # within the wait: it joins the first
    others = [queue.submit(req("cat two", seed=2)), queue.submit(req("cat three", seed=3))]
    finish(first, *others)
    assert engine.calls == [("batch", ["cat one", "cat two", "cat three"])]
    for job, prompt, seed in zip([first, *others], ["cat one", "cat two", "cat three"], [1, 2, 3]):
        assert job.error is None and [r.info["prompt"] for r in job.results] == [prompt]
        assert job.results[0].info["seed"] == seed and job.step == job.total == 3
    batch = [e for e in queue.recent_events() if e["event"] == "batch"]
    assert batch == [{"event": "batch", "job": first.id, "jobs": [first.id, others[0].id, others[1].id], "size": 3,
                      "rows": 3, "time": batch[0]["time"]}]  # fmt: skip
    assert not queue.busy and queue.current is None


def test_the_batch_event_says_what_the_engine_merged():
    """`batch_gathered`: the jobs handed to one generate_batch; `batch`: those the engine ran as one pipeline call
    (from their results' info["batch"]), none for a job that ran as a call of its own or failed."""
    engine, queue = blocked_queue(batch_wait=0.2, batch_max=8)
    jobs = [queue.submit(req(p)) for p in ["cat a", "cat split b", "cat c", "cat refuse", "cat split e"]]
    release(engine, queue)
    finish(*jobs)
    ids = [job.id for job in jobs]
    assert [(e["event"], e["jobs"], e["size"], e["rows"]) for e in queue.recent_events()
            if e["event"].startswith("batch")] == [("batch_gathered", ids, 5, 5), ("batch", [ids[0], ids[2]], 2, 2)]  # fmt: skip
    assert [job.results[0].info["batch"]["call"] for job in jobs if job.results] == [1, 2, 1, 3]


def test_the_wait_is_bounded_and_a_lone_job_runs_as_today():
    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_wait=0.4)
    started = time.monotonic()
    job = queue.submit(req("cat alone"))
    finish(job)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, elapsed
    assert engine.calls == [("generate", ["cat alone"])]
    assert not [e for e in queue.recent_events() if e["event"] == "batch"]


def test_the_worker_sleeps_while_it_waits_for_a_batch():
    """The gathering wait is a condition wait, not a poll: the process spends next to no CPU during it."""
    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_max=4, batch_wait=1.0)
    job = queue.submit(req("cat alone"))
    wait_until(lambda: engine.keys_asked == ["cat alone"], what="the worker gathering")
    cpu = time.process_time()
    finish(job)
    assert time.process_time() - cpu < 0.3  # a polling loop burns the whole second


def test_different_keys_are_not_mixed_and_keep_their_order():
    engine, queue = blocked_queue(batch_wait=0.3)
    jobs = [queue.submit(req(p)) for p in ["cat a", "dog a", "cat b", "alone x", "dog b", "cat c"]]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat a", "cat b", "cat c"]), ("batch", ["dog a", "dog b"]),
                                ("generate", ["alone x"])]  # fmt: skip


def test_the_wait_holds_only_while_nothing_else_waits():
    """Jobs of other keys already waiting end the wait at once: the device does not idle while work is queued. A
    job of another key that comes during the wait ends it too; the last job alone waits for mates as before."""
    engine, queue = blocked_queue(batch_wait=1.0)
    jobs = [queue.submit(req(f"{word} x")) for word in ("cat", "dog", "cow", "pig")]
    started = time.monotonic()
    release(engine, queue)
    finish(*jobs[:3])
    assert time.monotonic() - started < 0.6  # no wait before cat, dog, cow: others waited behind each
    finish(jobs[3])
    assert time.monotonic() - started >= 1.0  # pig, alone in the queue, waited for mates
    assert [kind for kind, _ in engine.calls[1:]] == ["generate"] * 4

    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_wait=1.5)
    cat = queue.submit(req("cat a"))
    wait_until(lambda: engine.keys_asked == ["cat a"], what="the worker gathering")
    arrived = time.monotonic()
    dog = queue.submit(req("dog b"))
    wait_until(lambda: cat.done.is_set(), what="cat running")
    assert time.monotonic() - arrived < 0.6 and not dog.done.is_set()
    finish(dog)
    assert engine.calls == [("generate", ["cat a"]), ("generate", ["dog b"])]


def test_jobs_of_several_iterations_run_alone():
    engine, queue = blocked_queue(batch_wait=0.3)
    jobs = [queue.submit(req("cat a")), queue.submit(req("cat b"), iterations=2), queue.submit(req("cat c"))]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat a", "cat c"]), ("generate", ["cat b"]), ("generate", ["cat b"])]
    assert [r.info["seed"] for r in jobs[1].results] == [1, 2]


def test_no_wait_means_no_batching_at_all():
    engine, queue = blocked_queue(batch_wait=0.0, batch_max=4)
    jobs = [queue.submit(req(f"cat {i}")) for i in range(3)]
    release(engine, queue)
    finish(*jobs)
    assert [kind for kind, _ in engine.calls] == ["generate"] * 4
    assert [prompts for _, prompts in engine.calls[1:]] == [["cat 0"], ["cat 1"], ["cat 2"]]
    assert engine.keys_asked == []  # today's behaviour: the engine is not even asked


def test_batch_max_is_respected():
    engine, queue = blocked_queue(batch_wait=0.2, batch_max=2)
    jobs = [queue.submit(req(f"cat {i}")) for i in range(5)]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat 0", "cat 1"]), ("batch", ["cat 2", "cat 3"]), ("generate", ["cat 4"])]


def test_batch_max_one_never_batches():
    engine, queue = blocked_queue(batch_wait=0.2, batch_max=1)
    jobs = [queue.submit(req(f"cat {i}")) for i in range(2)]
    release(engine, queue)
    finish(*jobs)
    assert [kind for kind, _ in engine.calls] == ["generate"] * 3


def test_the_default_batch_max_is_sized_from_device_memory():
    cpu = SimpleNamespace(device=torch.device("cpu"), activation_budget=100 * GiB)
    assert default_batch_max(cpu, req("cat")) == 4
    gpu = SimpleNamespace(device=torch.device("cuda"), activation_budget=int(4.8 * GiB))  # 20 % of a 24 GiB GPU
    big = GenerateRequest(model="m", prompt="cat", width=1024, height=1024)
    assert default_batch_max(gpu, big) == 9  # rows: 4.8 GiB / 0.5 GiB per 1024x1024 row
    assert default_batch_max(gpu, GenerateRequest(model="m", prompt="cat", width=512, height=512)) == 16  # the cap
    assert default_batch_max(SimpleNamespace(device=torch.device("cuda"), activation_budget=GiB // 4), big) == 1


def test_the_rows_of_every_job_count_against_the_batch_max():
    """The limit is rows, the sum of the jobs' batch sizes: the head's and each mate's. Oldest first, a mate whose
    rows do not fit what is left waits for a later batch; one that fits, younger, joins."""
    engine, queue = blocked_queue(batch_wait=0.2)
    engine.device, engine.activation_budget = torch.device("cuda"), int(4.8 * GiB)  # 9 rows of 1024x1024
    jobs = [queue.submit(req(f"cat {i}", size=1024, batch_size=n)) for i, n in enumerate([1, 4, 8, 4, 2, 8])]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat 0", "cat 1", "cat 3"]), ("generate", ["cat 2"]),
                                ("generate", ["cat 4"]), ("generate", ["cat 5"])]  # 9 rows, then 8, 2 + 8 > 9, 8  # fmt: skip

    engine, queue = blocked_queue(batch_wait=0.2, batch_max=5)  # given: rows too
    jobs = [queue.submit(req(f"cat {i}", batch_size=n)) for i, n in enumerate([1, 4, 2, 2, 1, 6])]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat 0", "cat 1"]), ("batch", ["cat 2", "cat 3", "cat 4"]),
                                ("generate", ["cat 5"])]  # fmt: skip


def test_bad_settings_are_refused():
    with pytest.raises(RequestError, match="batch_max"):
        JobQueue(FakeEngine(), batch_max=0)
    for wait in (-1, float("nan"), float("inf"), 60.5, 1e10):
        with pytest.raises(RequestError, match=r"batch_wait \(--batch-wait\) must be 0 \(no batching\) to 60 seconds"):
            JobQueue(FakeEngine(), batch_wait=wait)
    JobQueue(FakeEngine(), batch_wait=60)


def test_serve_flags_and_their_help(capsys):
    from imprompt.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--models", "m", "--batch-wait", "0.25", "--batch-max", "3"])
    assert (args.batch_wait, args.batch_max) == (0.25, 3)
    args = parser.parse_args(["serve", "--models", "m"])
    assert (args.batch_wait, args.batch_max) == (0.0, None)  # batching off; batch_max sized from the device
    for flag, value in (("--batch-wait", "-1"), ("--batch-wait", "inf"), ("--batch-wait", "1e10"), ("--batch-max", "0")):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--models", "m", flag, value])
        error = capsys.readouterr().err
        assert flag in error and (flag != "--batch-wait" or "from 0 to 60" in error), error
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--batch-wait SECONDS" in help_text and "0 (default) runs one request at a time" in help_text
    assert "--batch-max N" in help_text and "on the CPU 4" in help_text


class FaultyEngine(FakeEngine):
    """Faults outside any job's own run: its device cannot be read once (the default batch size reads it), a key
    raises, a batch gives an outcome that is no result."""

    def __init__(self):
        super().__init__()
        self.faults = {"device": 1}

    @property
    def device(self):
        if self.faults["device"]:
            self.faults["device"] -= 1
            raise RuntimeError("the device cannot be read (a test's fault)")
        return torch.device("cpu")

    @device.setter
    def device(self, value):
        pass

    def batch_key(self, request):
        if request.prompt.startswith("keyless"):
            raise RuntimeError("no key (a test's fault)")
        return super().batch_key(request)

    def generate_batch(self, requests, on_steps=None, interrupts=None):
        outcomes = super().generate_batch(requests, on_steps, interrupts)
        return [SimpleNamespace(info={}) if r.prompt.endswith("malformed") else o for r, o in zip(requests, outcomes)]


def test_the_worker_survives_faults_and_fails_only_the_jobs_in_hand():
    engine = FaultyEngine()
    queue = JobQueue(engine, max_queue=8, batch_wait=0.2)
    first = queue.submit(req("cat first"))  # the default batch size cannot read the device
    finish(first, seconds=5)
    assert isinstance(first.error, RuntimeError) and "device" in str(first.error)
    keyless = queue.submit(req("keyless cat"))  # no key: it runs alone
    finish(keyless, seconds=5)
    assert keyless.error is None and engine.calls[-1] == ("generate", ["keyless cat"])
    engine.gate.clear()
    jobs = [queue.submit(req("dog a")), queue.submit(req("dog malformed")), queue.submit(req("dog c"))]
    engine.gate.set()
    finish(*jobs, seconds=5)
    assert engine.calls[-1] == ("batch", ["dog a", "dog malformed", "dog c"])
    assert jobs[0].error is None and [r.info["prompt"] for r in jobs[0].results] == ["dog a"]
    assert isinstance(jobs[1].error, KeyError) and not jobs[1].results  # its outcome alone could not be read
    assert jobs[2].error is None and [r.info["prompt"] for r in jobs[2].results] == ["dog c"]
    after = queue.submit(req("cat after"))
    finish(after, seconds=5)
    assert after.error is None and not queue.busy


# ------------------------------------------------------------------------------------ each job keeps its own


def test_one_jobs_error_does_not_fail_the_others():
    engine, queue = blocked_queue(batch_wait=0.2)
    jobs = [queue.submit(req(p)) for p in ["cat a", "cat refuse", "cat crash", "cat d"]]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat a", "cat refuse", "cat crash", "cat d"])]
    assert [r.info["prompt"] for r in jobs[0].results] == ["cat a"] and jobs[0].error is None
    assert [r.info["prompt"] for r in jobs[3].results] == ["cat d"] and jobs[3].error is None
    assert isinstance(jobs[1].error, RequestError) and isinstance(jobs[2].error, RuntimeError)
    refused = [e["job"] for e in queue.recent_events() if e["event"] == "request_refused"]
    assert refused == [jobs[1].id]  # a fault is a 500 with its traceback in the log, not a refusal


def test_a_batch_that_fails_as_a_whole_runs_its_jobs_alone():
    engine, queue = blocked_queue(batch_wait=0.2)
    engine.batch_raises = RuntimeError("the merged call broke")
    jobs = [queue.submit(req(p)) for p in ["cat a", "cat crash", "cat c"]]
    release(engine, queue)
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat a", "cat crash", "cat c"]), ("generate", ["cat a"]),
                                ("generate", ["cat crash"]), ("generate", ["cat c"])]  # fmt: skip
    assert jobs[0].results[0].info["prompt"] == "cat a" and jobs[2].results[0].info["prompt"] == "cat c"
    assert isinstance(jobs[1].error, RuntimeError) and "cat crash" in str(jobs[1].error)
    fallback = {"event": "batch_fallback", "why": "RuntimeError: the merged call broke"}
    assert jobs[0].results[0].info["events"] == jobs[2].results[0].info["events"] == [fallback]
    assert [e["job"] for e in queue.recent_events() if e["event"] == "batch_fallback"] == [jobs[0].id, jobs[2].id]


def test_after_a_failed_batch_an_interrupt_stops_only_the_job_running():
    """The batch's call fails after its steps; its jobs then run alone, one after another. Job b, whose client left
    during the failed call, is not run again and gets an error saying so; A1111's interrupt during job a's run stops
    a alone (c and d have not started); d's client leaving before its turn drops d (an error, not an empty answer);
    c runs in full."""
    engine, queue = blocked_queue(batch_wait=0.2)
    engine.batch_raises = RuntimeError("the merged call broke")
    jobs = [queue.submit(req(f"cat {p}", steps=5)) for p in "abcd"]
    a, b, c, d = jobs
    release(engine, queue)
    engine.gate.clear()
    wait_until(lambda: len(queue.running) == 4 and d.step == 1, what="the batch running")
    queue.cancel(b, "the client disconnected")
    alone_gate = engine.holds[1, 1] = threading.Event()  # a's lone run holds at its first step
    engine.gate.set()
    wait_until(lambda: engine.calls[-1] == ("generate", ["cat a"]) and a.step == 1, what="a running alone")
    assert queue.running == [a] and queue.progress()["state"]["job_count"] == 4  # a; b, c and d held
    assert queue.interrupt() is True
    assert not c.interrupted and not d.interrupted
    queue.cancel(d, "the client disconnected")
    alone_gate.set()
    finish(*jobs)
    assert engine.calls[1:] == [("batch", ["cat a", "cat b", "cat c", "cat d"]), ("generate", ["cat a"]),
                                ("generate", ["cat c"])]  # fmt: skip
    assert [r.info["interrupted"] for r in a.results] == [True] and a.error is None
    assert isinstance(b.error, InterruptedRunError) and "the merged call broke" in str(b.error) and not b.results
    assert [r.info["interrupted"] for r in c.results] == [False] and c.step == 5
    assert isinstance(d.error, RequestError) and "dropped before it ran" in str(d.error) and not d.results
    assert not queue.busy and queue.progress()["state"]["job_count"] == 0


def test_cancelling_a_waiting_job_of_a_would_be_batch_drops_it():
    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_max=3, batch_wait=10)
    a, b = queue.submit(req("cat a")), queue.submit(req("cat b"))
    wait_until(lambda: engine.keys_asked == ["cat a", "cat b"], what="the worker gathering")
    queue.cancel(b, "the client disconnected")
    c, d = queue.submit(req("cat c")), queue.submit(req("cat d"))
    finish(a, b, c, d)
    assert engine.calls == [("batch", ["cat a", "cat c", "cat d"])]
    assert isinstance(b.error, RequestError) and "dropped" in str(b.error) and not b.results
    assert [e["job"] for e in queue.recent_events() if e["event"] == "request_dropped"] == [b.id]


def test_cancelling_the_job_being_gathered_for_lets_the_next_lead():
    engine = FakeEngine()
    queue = JobQueue(engine, max_queue=8, batch_max=2, batch_wait=10)
    a = queue.submit(req("cat a"))
    wait_until(lambda: engine.keys_asked == ["cat a"], what="the worker gathering")
    queue.cancel(a, "the client disconnected")
    b, c = queue.submit(req("cat b")), queue.submit(req("cat c"))
    finish(a, b, c)
    assert engine.calls == [("batch", ["cat b", "cat c"])] and isinstance(a.error, RequestError)


def test_interrupting_one_running_job_stops_only_it():
    engine, queue = blocked_queue(batch_wait=0.2)
    jobs = [queue.submit(req(p, steps=5)) for p in ["cat a", "cat b", "cat c"]]
    release(engine, queue)  # the blocker ends; the batch then holds at its first step
    engine.gate.clear()
    wait_until(lambda: len(queue.running) == 3 and jobs[2].step == 1, what="the batch running")
    assert queue.busy and queue.current is jobs[0]
    progress = queue.progress()
    assert progress["state"]["job_count"] == 3 and progress["state"]["sampling_step"] == 1
    assert progress["state"]["job"] == f"jobs {jobs[0].id}, {jobs[1].id}, {jobs[2].id}"
    queue.cancel(jobs[1], "the client disconnected")
    assert [job.stop.is_set() for job in jobs] == [False, True, False]
    assert not engine.flag.is_set()  # the engine's own interrupt is left alone
    engine.gate.set()
    finish(*jobs)
    assert [job.results[0].info["interrupted"] for job in jobs] == [False, True, False]
    assert [job.step for job in jobs] == [5, 1, 5]
    assert [e["job"] for e in queue.recent_events() if e["event"] == "request_interrupted"] == [jobs[1].id]


def test_the_a1111_interrupt_stops_every_job_of_the_running_batch():
    engine, queue = blocked_queue(batch_wait=0.2)
    jobs = [queue.submit(req(p, steps=5)) for p in ["cat a", "cat b"]]
    later = queue.submit(req("alone later", steps=5))
    release(engine, queue)
    engine.gate.clear()
    wait_until(lambda: len(queue.running) == 2 and jobs[1].step == 1, what="the batch running")
    assert queue.interrupt() is True
    assert [job.stop.is_set() for job in jobs] == [True, True] and not later.stop.is_set()
    engine.gate.set()
    finish(*jobs, later)
    assert [job.results[0].info["interrupted"] for job in jobs] == [True, True]
    assert later.results[0].info["interrupted"] is False  # the next job is not interrupted
    assert queue.interrupt() is False  # nothing runs


def test_progress_over_a_batch_whose_first_job_stopped():
    """The first job's client left at step 1; the other, at step 3 of 5, is what the progress shows, not interrupted."""
    engine = FakeEngine(hold=True)
    later = engine.holds[1, 3] = threading.Event()
    queue = JobQueue(engine, max_queue=8, batch_wait=0.3)
    jobs = [queue.submit(req("cat a", steps=5)), queue.submit(req("cat b", steps=5))]
    wait_until(lambda: len(queue.running) == 2 and jobs[1].step == 1, what="the batch at step 1")
    queue.cancel(jobs[0], "the client disconnected")
    engine.gate.set()
    wait_until(lambda: jobs[1].step == 3, what="the batch at step 3")
    progress = queue.progress()
    assert progress["progress"] == 0.6 and progress["eta_relative"] > 0
    assert progress["state"]["interrupted"] is False
    assert (progress["state"]["sampling_step"], progress["state"]["sampling_steps"]) == (3, 5)
    queue.interrupt()  # now every job is stopped
    assert queue.progress()["state"]["interrupted"] is True
    later.set()
    finish(*jobs)


def test_progress_over_a_batch_that_runs_as_two_calls():
    """A batch whose second job runs as a call of its own after the first's: while the first runs, the second
    counts 0 (its step 0 of its steps shown); while the second runs, the first's finished call does not make the
    batch look done (no 1.0, no ETA 0)."""
    engine = FakeEngine()
    first, second = engine.holds[1, 3], engine.holds[2, 2] = threading.Event(), threading.Event()
    queue = JobQueue(engine, max_queue=8, batch_wait=0.3)
    jobs = [queue.submit(req("cat a", steps=5)), queue.submit(req("cat split b", steps=4))]
    wait_until(lambda: jobs[0].step == 3, what="the first call at step 3")
    progress = queue.progress()
    assert progress["progress"] == 0.3 and progress["state"]["sampling_step"] == 0
    assert progress["state"]["sampling_steps"] == 4
    first.set()
    wait_until(lambda: jobs[1].step == 2, what="the second call at step 2")
    progress = queue.progress()
    assert progress["progress"] == 0.75 and progress["eta_relative"] > 0  # (1 + 2/4) / 2
    assert (progress["state"]["sampling_step"], progress["state"]["sampling_steps"]) == (2, 4)
    second.set()
    finish(*jobs)
    assert engine.calls == [("batch", ["cat a", "cat split b"])]


def test_a_lone_job_is_still_interrupted_through_the_engine():
    engine = FakeEngine(hold=True)
    queue = JobQueue(engine, max_queue=8, batch_wait=0.1)
    job = queue.submit(req("alone x", steps=5))
    wait_until(lambda: job.step == 1, what="the job running")
    assert queue.interrupt() is True and engine.flag.is_set() and not job.stop.is_set()
    engine.gate.set()
    finish(job)
    assert job.results[0].info["interrupted"] is True


# ----------------------------------------------------------------------------------------------- the real engine


def test_the_real_engine_batches_equal_keys_and_runs_others_alone(pack):
    """The queue over a real engine: two requests of one key run as one call, one of another key (more steps) alone
    and after them; every image is its image alone (another engine, no queue) within 1/255."""
    from imprompt import Engine

    from conftest import MODEL, max_diff

    engine = Engine(pack)
    queue = JobQueue(engine, max_queue=8, batch_max=4, batch_wait=0.5)
    fields = {"model": MODEL, "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0}
    requests = [GenerateRequest(**fields, prompt="a red cat", seed=11),
                GenerateRequest(**{**fields, "steps": 5}, prompt="a blue dog", seed=12),
                GenerateRequest(**fields, prompt="a green bird", seed=13)]  # fmt: skip
    since = time.time()
    jobs = [queue.submit(r) for r in requests]
    finish(*jobs, seconds=300)
    assert [job.error for job in jobs] == [None] * 3
    batches = [e for e in queue.recent_events(since) if e["event"] == "batch"]
    assert [(e["jobs"], e["size"]) for e in batches] == [([jobs[0].id, jobs[2].id], 2)]
    assert jobs[0].results[0].info["batch"] == jobs[2].results[0].info["batch"] == {"size": 2, "requests": 2, "call": 1}
    assert "batch" not in jobs[1].results[0].info
    assert jobs[1].started >= jobs[2].started  # the other key waited its turn
    alone = Engine(pack)
    for job, request in zip(jobs, requests):
        assert job.results[0].info["seed"] == request.seed and job.step == job.total > 0  # each saw its progress
        assert max_diff(job.results[0].images[0], alone.generate(request).images[0]) <= 1


def test_the_served_batch_equals_each_request_alone(pack):
    """`imprompt serve --batch-wait 0.5 --batch-max 4`: three concurrent clients' txt2img run as one batch (the
    `batch` event), and each image equals the same request's from a server without batching, within 1/255."""
    import json
    import subprocess
    import sys

    import httpx

    from conftest import max_diff
    from server_fixtures import decode, free_port, new_engine, running_server

    port = free_port()
    command = [sys.executable, "-m", "imprompt.cli", "serve", "--models", str(pack), "--port", str(port),
               "--model", "tiny-sd15", "--batch-wait", "0.5", "--batch-max", "4"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    payloads = [{"prompt": prompt, "negative_prompt": "", "seed": seed, "steps": 4, "cfg_scale": 7.0, "width": 64,
                 "height": 64, "sampler_name": "Euler a"}
                for prompt, seed in (("a red cat", 21), ("a blue dog", 22), ("a green bird", 23))]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=300) as http:  # the model loads before the clients come
            assert http.post("/sdapi/v1/txt2img", json={**payloads[0], "seed": 99}).status_code == 200
            since = time.time()
            bodies: dict[int, dict] = {}
            start = threading.Barrier(len(payloads))

            def send(index: int) -> None:
                with httpx.Client(base_url=url, timeout=300) as own:  # a client of its own, as separate users
                    start.wait()
                    response = own.post("/sdapi/v1/txt2img", json=payloads[index])
                    assert response.status_code == 200, response.text[:2000]
                    bodies[index] = response.json()

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(payloads))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
            assert sorted(bodies) == [0, 1, 2]
            batches = [e for e in http.get("/v1/events", params={"since": since}).json() if e["event"] == "batch"]
            assert [(e["size"], e["rows"], len(e["jobs"])) for e in batches] == [(3, 3, 3)], batches
    finally:
        process.terminate()
        process.wait(timeout=30)
    batched = {i: (decode(body["images"][0]).convert("RGB"), json.loads(body["info"])) for i, body in bodies.items()}
    with running_server(new_engine(pack), model="tiny-sd15") as plain, httpx.Client(base_url=plain, timeout=300) as http:
        for index, payload in enumerate(payloads):
            body = http.post("/sdapi/v1/txt2img", json=payload).json()
            image, info = batched[index]
            assert info["seed"] == payload["seed"] and info["prompt"] == payload["prompt"]
            assert max_diff(image, decode(body["images"][0]).convert("RGB")) <= 1, index
            assert [e for e in http.get("/v1/events").json() if e["event"] == "batch"] == []


def test_a_client_leaving_a_real_batch_stops_only_its_request(pack):
    """Cancelling one running job of a real batch (its client left) stops its rows; the other's image is its
    image alone."""
    from imprompt import Engine

    from conftest import MODEL, max_diff

    engine = Engine(pack)
    queue = JobQueue(engine, max_queue=8, batch_max=2, batch_wait=5)
    fields = {"model": MODEL, "steps": 40, "width": 64, "height": 64, "cfg_scale": 7.0}
    stays, leaves = GenerateRequest(**fields, prompt="a red cat", seed=31), GenerateRequest(**fields, prompt="a dog", seed=32)
    jobs = [queue.submit(stays), queue.submit(leaves)]
    wait_until(lambda: len(queue.running) == 2 and jobs[1].step >= 2, seconds=300, what="the batch running")
    queue.cancel(jobs[1], "the client disconnected")
    finish(*jobs, seconds=300)
    assert jobs[0].results[0].info["interrupted"] is False and jobs[1].results[0].info["interrupted"] is True
    assert jobs[1].step < jobs[1].total and jobs[0].step == jobs[0].total
    assert max_diff(jobs[0].results[0].images[0], Engine(pack).generate(stays).images[0]) <= 1
