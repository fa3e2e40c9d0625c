"""seqlab.host_memory: with the policy, a freed large block is reused without new page faults."""

import platform
import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB block, then does it again and prints the minor page faults of the second
# round. Run in a fresh process so that the allocator policy of the test process does not matter.
_PROBE = """
import ctypes, ctypes.util, resource, sys
from seqlab import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "policy" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

PAGES = (64 << 20) // 4096


def _second_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_policy_reuses_freed_block_without_page_faults():
    assert _second_round_faults("default") == ("False", pytest.approx(PAGES, rel=0.1))
    applied, faults = _second_round_faults("policy")
    assert applied == "True"
    assert faults < PAGES // 100
