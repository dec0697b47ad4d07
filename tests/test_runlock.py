"""One writer per run folder: a second `mllm train` on a folder being trained refuses with the first
one's host and pid; a lock left by a killed process (dead pid on this host, pid reused, or no heartbeat
from another host for STALE_S) is detected as stale and taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from cluster_helpers import REPO, lm_recipe, make_base, write_recipe
from helpers import subprocess_env

from mllm.cli import main
from mllm.training.runlock import LOCK_NAME, RunLock, RunLocked

HOLDER = """
import sys, time
from mllm.training.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def holder(tmp_path):
    """Another live process holding the lock of tmp_path/run."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")],
        env=subprocess_env(REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_with_host_and_pid(tmp_path, holder):
    with pytest.raises(RunLocked) as e:
        RunLock(tmp_path / "run").acquire()
    msg = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "one writer per run folder" in msg


def test_mllm_train_on_a_locked_folder_is_a_one_line_error(tmp_path, holder, capsys):
    setup = make_base(tmp_path / "base")
    rec = write_recipe(lm_recipe(setup), tmp_path / "r.yaml")
    assert main(["train", "--recipe", str(rec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pid {holder.pid}" in err, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing else written


def test_lock_of_a_killed_process_is_stale(tmp_path, holder):
    holder.kill()  # SIGKILL: no cleanup ran, the file stays
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).is_file()
    lock = RunLock(tmp_path / "run").acquire()
    try:
        assert f"pid {holder.pid} on this host is gone" in lock.took_over["reason"]
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def _plant(run, **info):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_NAME).write_text(json.dumps({"nonce": "x", "since": "then", **info}))


def test_reused_pid_and_other_hosts(tmp_path):
    run = tmp_path / "run"
    # Our own pid, but recorded with another start time: the pid was reused by a younger process.
    _plant(run, host=socket.gethostname(), pid=os.getpid(), start_time=1)
    lock = RunLock(run).acquire()
    assert "now belongs to another process" in lock.took_over["reason"]
    lock.release()
    # Another host with a fresh heartbeat: alive as far as anyone here can tell.
    _plant(run, host="node-elsewhere", pid=1234)
    with pytest.raises(RunLocked, match="pid 1234 on host node-elsewhere"):
        RunLock(run).acquire()
    # ... and the same lock untouched for longer than STALE_S: its holder is gone.
    old = time.time() - 3600
    os.utime(run / LOCK_NAME, (old, old))
    lock = RunLock(run, stale_s=300).acquire()
    assert "no heartbeat from host node-elsewhere" in lock.took_over["reason"]
    lock.release()


def test_heartbeat_and_release_only_of_our_own_lock(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run, heartbeat_s=0.05).acquire()
    path = run / LOCK_NAME
    old = time.time() - 3600
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # the heartbeat touched it
    path.unlink()
    _plant(run, host="node-elsewhere", pid=99)  # someone else's lock now: release leaves it
    lock.release()
    assert path.is_file()


def test_mllm_train_called_with_a_process_group_up_returns_its_status(tmp_path, holder, capsys):
    """A program (this test suite, a notebook) that calls `main` with its own process group up gets the
    status back: only a group the command itself started is torn down with os._exit. Before, an earlier
    test's leftover group made this refusal end the whole pytest process with status 2."""
    import torch.distributed as dist

    ours = not dist.is_initialized()  # in the full suite an earlier test's group may be up already
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        setup = make_base(tmp_path / "base")
        rec = write_recipe(lm_recipe(setup), tmp_path / "r.yaml")
        assert main(["train", "--recipe", str(rec), "--out", str(tmp_path / "run")]) == 2
        assert dist.is_initialized()  # still ours, untouched
    finally:
        if ours:
            dist.destroy_process_group()
    assert f"pid {holder.pid}" in capsys.readouterr().err
