"""One driver at a time per run name: a lease file in the run's storage, with a heartbeat.

Two drivers of the same command (a job submitted twice, a "killed" driver still alive) would write the same Ray
Train storage and break each other's checkpoints. `rayflow.train` / `rayflow.tune` take the lease
`<storage>/<name>/lease.json` before any Ray Train run starts and refresh its heartbeat while they run. A live
lease refuses a second launch at once; a dead one (its heartbeat stopped, or its process is gone from this
host) is taken over, so rerunning a killed command resumes it. Works on local disk and on any filesystem
pyarrow reaches (s3://, gs://, NFS mounts): only whole-file reads and writes.

The holder writes lease.json once; its heartbeat goes to a file of its own, `lease.<token>.beat`. Those stores
have no compare-and-swap, so a heartbeat that rewrote lease.json could, between reading it and writing it,
overwrite the record of a driver that had just taken over; a beat file cannot.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime

import pyarrow.fs as pafs

LEASE_FILE = "lease.json"
HEARTBEAT_S = 5.0  # how often a holder refreshes its heartbeat
STALE_S = 30.0  # a heartbeat this old means the holder is gone (another host's process can't be checked)


class LeaseHeld(RuntimeError):
    """Another live driver holds the run's lease; the message is one line saying who and how to proceed."""


def _fs_path(storage: str, name: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    return fs, f"{root.rstrip('/')}/{name}/{LEASE_FILE}"


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None  # absent, or a torn write of a holder that died mid-write: not a live lease


def _write(fs: pafs.FileSystem, path: str, record: dict) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{record['token']}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(record).encode())
    fs.move(tmp, path)  # a reader sees the old or the new record, never half of one


def _beat_path(path: str, token: str) -> str:
    return f"{path.rsplit('/', 1)[0]}/lease.{token}.beat"


def _heartbeat(fs: pafs.FileSystem, path: str, record: dict) -> float:
    """The holder's last heartbeat: its beat file's, or the record's own (written when it took the lease)."""
    beat = _read(fs, _beat_path(path, str(record.get("token"))))
    return max(float(record.get("heartbeat", 0)), float((beat or {}).get("heartbeat", 0)))


def _alive(record: dict, heartbeat: float, now: float) -> bool:
    if now - heartbeat > STALE_S:
        return False
    if record.get("host") == socket.gethostname():  # on this host the process itself can be asked
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def _describe(record: dict, heartbeat: float, storage: str, name: str, now: float) -> str:
    since = datetime.fromtimestamp(float(record["started"]), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"run '{name}' in {storage} is already running: {record.get('owner')}@{record.get('host')} pid "
            f"{record.get('pid')} since {since} (heartbeat {now - heartbeat:.0f} s ago); FIX THIS "
            f"by waiting for it, stopping it (kill -INT {record.get('pid')} on {record.get('host')}), or choosing "
            "another run.name")


class Lease:
    """A held lease; `release` (or leaving `hold`) deletes it."""

    def __init__(self, fs: pafs.FileSystem, path: str, record: dict):
        self.fs, self.path, self.record = fs, path, record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="rayflow-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        token = self.record["token"]
        while not self._stop.wait(HEARTBEAT_S):
            current = _read(self.fs, self.path)
            if current is not None and current.get("token") != token:
                return  # taken over (we were presumed dead): stop beating
            try:
                _write(self.fs, _beat_path(self.path, token), {"token": token, "heartbeat": time.time()})
            except OSError:
                pass  # storage hiccup: the next beat retries; STALE_S is several beats long

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        current = _read(self.fs, self.path)
        mine = [_beat_path(self.path, self.record["token"])]
        if current is not None and current.get("token") == self.record["token"]:
            mine.append(self.path)
        for path in mine:
            try:
                self.fs.delete_file(path)
            except OSError:
                pass  # absent, or a stale lease the next launch takes over anyway


def acquire(storage: str, name: str) -> Lease:
    """Take the lease of run `name` in `storage`, or raise LeaseHeld when a live driver holds it."""
    fs, path = _fs_path(storage, name)
    now = time.time()
    held = _read(fs, path)
    if held is not None and _alive(held, _heartbeat(fs, path, held), now):
        raise LeaseHeld(_describe(held, _heartbeat(fs, path, held), storage, name, now))
    record = {"owner": getpass.getuser(), "host": socket.gethostname(), "pid": os.getpid(), "started": now,
              "heartbeat": now, "token": uuid.uuid4().hex, "run": name}
    _write(fs, path, record)
    time.sleep(0.2)  # two takers at the same instant: the last write wins, the other sees it and backs off
    current = _read(fs, path)
    if current is None or current.get("token") != record["token"]:
        winner = current or record
        raise LeaseHeld(_describe(winner, _heartbeat(fs, path, winner), storage, name, time.time()))
    if held is not None and held.get("token"):
        try:
            fs.delete_file(_beat_path(path, str(held["token"])))  # the dead holder's beat file
        except OSError:
            pass
    return Lease(fs, path, record)


@contextmanager
def hold(storage: str, name: str):
    """`with hold(storage, name):` the run's lease for the block (see `acquire`)."""
    lease = acquire(storage, name)
    try:
        yield lease
    finally:
        lease.release()
