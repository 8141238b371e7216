"""The vLLM general plugin that requests AMX permission (workloads/common/vllm_plugin.py).

Each check runs in a fresh interpreter: the permission is per process, and pytest's own process
may already hold it from an earlier bfloat16 matmul.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

# arch_prctl(ARCH_GET_XCOMP_PERM) and the XTILEDATA bit of the permitted-features mask.
PERMISSION = """
import ctypes
def amx_permitted():
    mask = ctypes.c_uint64(0)
    ctypes.CDLL(None, use_errno=True).syscall(158, 0x1022, ctypes.byref(mask))
    return bool(mask.value & (1 << 18))
"""


def _amx_cpu() -> bool:
    import torch

    return sys.platform == "linux" and torch.cpu._is_amx_tile_supported()


def _run(body: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PERMISSION + body],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not _amx_cpu(), reason="needs Linux on a CPU with AMX")
def test_vllm_loads_the_plugin_and_it_grants_amx_before_any_matmul():
    # Without it, a fresh process holds no AMX permission (so this check can fail) ...
    assert _run("import torch; print(amx_permitted())") == "False"
    # ... and vLLM's own plugin loader, which every engine and worker process runs, grants it.
    assert (
        _run(
            "import torch\n"
            "from vllm.plugins import load_general_plugins\n"
            "before = amx_permitted()\n"
            "load_general_plugins()\n"
            "print(before, amx_permitted())"
        )
        == "False True"
    )
