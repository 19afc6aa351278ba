"""Runtime settings: the autocast dtype of a precision flag (and whether the hardware runs it natively),
and process-level tuning for the command-line tools (never applied on import).

``keep_freed_memory()``: glibc's malloc hands every block larger than 32 MiB straight back to the
operating system when it is freed, so the next such block is mapped afresh and every page faults on
first touch. A DETR-R50 at 800x1066 allocates dozens of such activations per image (a stage-1 feature
map alone is 55 MB), and the faults cost more than some of the convolutions that write them (measured:
a 1x1 convolution writing 55 MB took 37 ms with fresh pages and 12 ms with reused ones). Turning off
mmap for large blocks and raising the trim threshold keeps freed memory in the process for reuse: the
heap grows over the first steps (an aligned request can find a freed block a few bytes too small) until its
free space holds a step's working set, and from then on nothing is mapped again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
ENV_FLAG = "DETR_MALLOC_TUNING"  # set to 0 to leave malloc alone


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc malloc reuse large freed blocks instead of unmapping them; True if applied.

    A no-op (False) off Linux/glibc or with ``DETR_MALLOC_TUNING=0``. The process keeps up to
    ``trim_threshold`` bytes of freed memory for reuse.
    """
    if os.environ.get(ENV_FLAG, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if not applied:
        log.debug("mallopt refused the large-block settings")
    return applied


CPUINFO = Path("/proc/cpuinfo")
# x86: AVX512-BF16 (bf16 dot products) or AMX-BF16 (tile matmuls); Arm: the BF16 extension.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpuinfo_value(keys: tuple[str, ...]) -> str | None:
    """The value of the first line of /proc/cpuinfo whose key is one of ``keys``; None without one."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them ("flags" on x86, "Features" on Arm); empty elsewhere."""
    return frozenset((_cpuinfo_value(("flags", "Features")) or "").split())


def cpu_model() -> str:
    """The CPU's model name as Linux reports it ("model name" on x86), or "unknown"; for benchmark records."""
    return _cpuinfo_value(("model name",)) or "unknown"


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware (autocast to bf16 then pays; without it the CPU
    emulates bf16 and runs several times slower than fp32). CUDA: ``torch.cuda.is_bf16_supported``
    without emulation (Ampere and later); CPU: the avx512_bf16 / amx_bf16 (x86) or bf16 (Arm) flag."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & CPU_BF16_FLAGS)
    return False


def amp_dtype(amp: str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` / ``--precision``: None for None or "fp32", else bf16 or fp16
    (fp16 only on CUDA). bf16 on a CPU without bf16 instructions is allowed, with a warning: it is slower."""
    if amp is None or amp == "fp32":
        return None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {amp!r}")
    if torch.device(device).type == "cpu" and amp == "fp16":
        raise ValueError("fp16 autocast is for CUDA; use bf16 on the CPU")
    if amp == "bf16" and torch.device(device).type == "cpu" and not native_bf16(device):
        message = ("bf16 requested on a CPU without bf16 instructions (no avx512_bf16, amx_bf16 or bf16 flag in "
                   f"{CPUINFO}): PyTorch emulates bf16 there, which is several times slower than fp32")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return dtypes[amp]
