"""medadv keeps freed tensor memory in the process (glibc): a freed 64 MiB activation stays resident for the
next step instead of being unmapped and page-faulted back (issue 19's system time)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt is what medadv tunes; other platforms keep their allocator")

PROBE = """
import json, os
import medadv.jobs  # the job layer applies the setting on import
from medadv import allocator
import torch
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
before = rss()
x = torch.ones(64 << 18)  # 64 MiB, written: resident
del x
print(json.dumps({"kept_mib": rss() - before, "state": allocator.state()}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("MEDADV_MALLOC", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_job_layer_keeps_freed_memory_and_glibc_defaults_return_it():
    tuned, default = _probe(), _probe(MEDADV_MALLOC="default")
    assert tuned["state"]["applied"] is True, tuned
    assert tuned["kept_mib"] > 48, tuned  # the freed 64 MiB block is still ours, ready for the next step
    assert default["state"] == {"applied": False, "why": "MEDADV_MALLOC=default: glibc defaults kept"}
    assert default["kept_mib"] < 16, default  # glibc unmapped it on free


def test_a_user_s_own_malloc_settings_are_left_alone():
    state = _probe(MALLOC_TOP_PAD_="1048576")["state"]
    assert state["applied"] is False and "MALLOC_TOP_PAD_ set by the user" in state["why"]


def test_every_run_records_what_was_done_to_the_allocator():
    import medadv.jobs  # noqa: F401
    from medadv import allocator
    from medadv.runinfo import environment

    assert environment()["allocator"] == allocator.state()["why"]
