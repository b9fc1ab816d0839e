"""What `imprompt serve --workers` stops when it ends, without starting Ray: the processes of its own Ray session
(the ones `ray.init` started name the session's folder on their command line; Ray's agents and workers are their
children), never another child of the process that served (an embedding program's, a test's)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from server_fixtures import wait_until

psutil = pytest.importorskip("psutil")

from imprompt.cluster.start import session_processes, stop_left_over  # noqa: E402


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # killed; its new parent has not reaped it
    except psutil.NoSuchProcess:
        return True


def test_the_cluster_stops_its_own_ray_session_and_no_other_child(tmp_path):
    session_dir = str(tmp_path / "ray" / "session_2026-01-01_00-00-00_000000_1")
    before = subprocess.Popen(["sleep", "60"])  # the embedding program's children, from before Ray and after
    # a stand-in for Ray's raylet: its command line names the session, and it starts a worker that does not
    raylet = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)",
                               f"--session_dir={session_dir}"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    worker = int(raylet.stdout.readline())
    after = subprocess.Popen(["sleep", "60"])
    try:
        recorded = session_processes(session_dir)
        assert {p.pid for p in recorded} == {raylet.pid, worker}
        stop_left_over(recorded, wait_s=1.0)
        wait_until(lambda: gone(raylet.pid) and gone(worker), 10, "the session's processes stopped")
        assert before.poll() is None and after.poll() is None, "the cluster's stop killed a child that is not Ray's"
    finally:
        for process in (before, after, raylet):
            process.kill()
            process.wait(10)
        if not gone(worker):
            psutil.Process(worker).kill()
