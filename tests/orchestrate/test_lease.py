"""The run lease on a real filesystem and with real processes (no Ray): refuse, take over, heartbeat."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rayflow.orchestrate import lease
from rayflow.orchestrate.lease import LeaseHeld, acquire, hold


def _record(path, **over):
    rec = {"owner": "someone", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
           "heartbeat": time.time(), "token": "other", "run": "r"} | over
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_a_live_lease_refuses_a_second_driver_with_one_line(tmp_path):
    with hold(str(tmp_path), "r"):
        with pytest.raises(LeaseHeld) as err:
            acquire(str(tmp_path), "r")
        msg = str(err.value)
        assert "\n" not in msg and f"pid {os.getpid()}" in msg and "FIX THIS" in msg and "run.name" in msg
        with hold(str(tmp_path), "other-run"):  # another run name is independent
            pass
    assert not (tmp_path / "r" / "lease.json").exists()  # released
    with hold(str(tmp_path), "r"):
        pass


def test_a_lease_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _record(tmp_path / "r" / "lease.json", pid=dead.pid)
    with hold(str(tmp_path), "r") as held:
        assert held.record["pid"] == os.getpid()


def test_a_lease_with_a_stopped_heartbeat_on_another_host_is_taken_over(tmp_path):
    _record(tmp_path / "r" / "lease.json", host="elsewhere", heartbeat=time.time() - lease.STALE_S - 1)
    with hold(str(tmp_path), "r"):
        pass
    _record(tmp_path / "r" / "lease.json", host="elsewhere")  # fresh heartbeat elsewhere: live
    with pytest.raises(LeaseHeld, match="someone@elsewhere"):
        acquire(str(tmp_path), "r")


def test_heartbeat_refreshes_and_never_overwrites_a_new_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    held = acquire(str(tmp_path), "r")
    path = tmp_path / "r" / "lease.json"
    beat = tmp_path / "r" / f"lease.{held.record['token']}.beat"
    first = json.loads(path.read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(beat.read_text())["heartbeat"] > first
    snapshot = path.read_text()
    assert json.loads(snapshot)["token"] == held.record["token"]  # the heartbeat never rewrites lease.json ...
    time.sleep(0.3)
    assert path.read_text() == snapshot
    _record(path, token="new-holder")  # ... so a driver that took over (we were presumed dead) keeps its record
    time.sleep(0.3)
    assert json.loads(path.read_text())["token"] == "new-holder"
    held.release()
    assert json.loads(path.read_text())["token"] == "new-holder"  # release leaves the new holder's lease
    assert not beat.exists()  # and takes its own beat file


def test_a_holder_is_alive_while_its_beat_file_is_fresh(tmp_path):
    """The record's heartbeat is its acquisition time; a live holder's beat file keeps it from being taken over."""
    path = tmp_path / "r" / "lease.json"
    _record(path, host="elsewhere", heartbeat=time.time() - lease.STALE_S - 1)
    (tmp_path / "r" / "lease.other.beat").write_text(json.dumps({"token": "other", "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld, match="heartbeat 0 s ago"):
        acquire(str(tmp_path), "r")
    (tmp_path / "r" / "lease.other.beat").write_text(
        json.dumps({"token": "other", "heartbeat": time.time() - lease.STALE_S - 1}))
    with hold(str(tmp_path), "r"):  # both stale: taken over, and the dead holder's beat file goes
        assert not (tmp_path / "r" / "lease.other.beat").exists()


def test_another_process_holds_it_until_killed(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from rayflow.orchestrate.lease import acquire
        acquire({str(tmp_path)!r}, "r")
        print("held", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            acquire(str(tmp_path), "r")
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no release, the file stays
        holder.wait()
    assert (tmp_path / "r" / "lease.json").exists()
    with hold(str(tmp_path), "r"):  # its process is gone: taken over at once, no wait for the heartbeat
        pass
