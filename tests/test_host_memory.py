"""keep_freed_host_memory: large freed blocks are reused instead of faulted in again."""

import subprocess
import sys

import pytest

# Allocates and touches a 64 MiB block ten times; prints the page faults of the last nine.
_PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from sam_jax.utils.host_memory import keep_freed_host_memory
    assert keep_freed_host_memory()
def touch():
    a = np.empty(16 * 2**20, np.float32); a.fill(1.0); return float(a[-1])
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_without_page_faults():
    stock, kept = _faults("stock"), _faults("keep")
    # Stock glibc returns each block to the kernel and faults it back in: at least one fault
    # per 2 MiB even with transparent huge pages (4 KiB pages give 16384 per block).
    assert stock >= 9 * 32
    assert kept <= stock // 20  # reused: (almost) no new faults
