"""rayflow.malloc: glibc keeps freed memory, so a torch step stops faulting pages back in every time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from rayflow.malloc import keep_freed_memory
    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    net = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)])
    x = torch.randn(32, 16, 32, 32)  # 2 MiB activations: above glibc's default mmap threshold
    for _ in range(3):
        net(x).sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x).sum().backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keeping_freed_memory_removes_the_page_faults_of_every_step():
    faults = {mode: int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                                       check=True, timeout=300).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 1000, faults  # the storm this guards against (fails if glibc stops doing it)
    assert faults["keep"] < faults["default"] / 10, faults
