"""A vLLM general plugin (entry point group `vllm.general_plugins`, see pyproject.toml).

vLLM loads general plugins in every process it starts: the API server, the engine core and each
model worker. This one asks Linux for permission to use AMX tile data in that process.

Why: on a CPU with AMX, vLLM's CPU attention backend picks its AMX kernels for bfloat16
(`_get_attn_isa` in vllm/v1/attention/backends/cpu_attn.py), but never requests the permission
those instructions need (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`, Linux 5.16+). A process
has it only if something else asked first: oneDNN does on its first bfloat16 matmul. Whether that
happens before the first attention call depends on the code path, and under Ray Serve it does not:
the model worker dies of SIGILL ("Illegal instruction") on its first request. Requesting it here
is what PyTorch's own `torch.cpu._init_amx()` is for; on a CPU without AMX it returns False and
does nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register() -> None:
    """Request AMX tile-data permission for this process where the CPU has AMX."""
    import torch

    if torch.cpu._is_amx_tile_supported() and not torch.cpu._init_amx():
        log.warning("the CPU has AMX but Linux refused AMX tile-data permission to this process")
