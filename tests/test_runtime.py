"""keep_freed_memory: large freed blocks are reused instead of being mapped (and page-faulted) again."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, torch
from detr.runtime import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(16 << 20); del x  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
per_block = []  # page faults of each new 64 MiB block
for _ in range(7):
    before = faults()
    x = torch.ones(16 << 20)
    per_block.append(faults() - before)
    del x
print(json.dumps({"applied": applied, "faults": min(per_block)}))
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
    pages = (64 << 20) // 4096  # every page of one 64 MiB block
    # "faults": the fewest page faults of 7 fresh blocks. Untouched, every block is mapped afresh; tuned,
    # freed blocks come back already mapped (not every time: glibc's aligned allocations can leave a freed
    # block a few bytes short of the next request, which then grows the heap instead).
    assert untouched["faults"] > 0.9 * pages
    assert tuned["faults"] < 0.05 * pages
