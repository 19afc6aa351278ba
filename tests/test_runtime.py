"""keep_freed_memory: large freed blocks are reused instead of being mapped (and page-faulted) again."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, torch
from detr.runtime import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20); del x  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
before = faults()
for _ in range(5):
    x = torch.ones(16 << 20); del x
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _run(env_flag: str | None) -> dict:
    env = dict(os.environ)
    env.pop("DETR_MALLOC_TUNING", None)
    if env_flag is not None:
        env["DETR_MALLOC_TUNING"] = env_flag
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_large_blocks_are_reused():
    tuned, untouched = _run(None), _run("0")
    assert tuned["applied"] and not untouched["applied"]
    pages = 5 * (64 << 20) // 4096  # every page of 5 fresh 64 MiB blocks
    assert untouched["faults"] > 0.5 * pages  # mapped afresh each time
    assert tuned["faults"] <= 0.25 * pages  # freed blocks come back already mapped (at most one fresh one)
