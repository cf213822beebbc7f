"""Checkpoint writes are atomic: a crash while `save_state_dict` writes never leaves a file that loads wrong."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from rayflow.models import save_state_dict


def _state(value: float) -> dict:
    return {"models": {"w": torch.full((256, 256), value)}, "counters": {"images_seen": int(value)}}


def _half_write_then(error: BaseException):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]  # a write that stopped midway
        if hasattr(f, "write"):
            f.write(half)
        else:
            with open(f, "wb") as out:
                out.write(half)
        raise error

    return save


def _assert_previous_intact(path) -> None:
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["models"]["w"], _state(1.0)["models"]["w"])
    assert loaded["counters"] == {"images_seen": 1}


def test_a_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_state_dict(_state(1.0), path)
    monkeypatch.setattr(torch, "save", _half_write_then(OSError("No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(_state(2.0), path)
    _assert_previous_intact(path)


def test_a_failed_write_leaves_no_partial_file_behind(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_state_dict(_state(1.0), path)
    monkeypatch.setattr(torch, "save", _half_write_then(OSError("No space left on device")))
    with pytest.raises(OSError):
        save_state_dict(_state(2.0), path)
    assert sorted(os.listdir(tmp_path)) == ["state.pt"]


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "state.pt"
    save_state_dict(_state(1.0), path)
    # A real crash: the writing process dies (SIGKILL) with half the new file on disk; no Python cleanup runs.
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from rayflow.models import save_state_dict
        real_save = torch.save
        def save(obj, f, *a, **k):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(half)
                f.flush()
            else:
                with open(f, "wb") as out:
                    out.write(half)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save
        save_state_dict({{"models": {{"w": torch.full((256, 256), 2.0)}}, "counters": {{"images_seen": 2}}}},
                        {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    _assert_previous_intact(path)
    # whatever the crash left is a hidden temp file, never the checkpoint's name
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == ["state.pt"]
