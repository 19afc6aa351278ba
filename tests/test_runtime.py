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
per_step = []  # page faults of each step
for _ in range(40):
    before = faults()
    x = torch.ones(16 << 20); y = x + 1; z = y * x  # three live 64 MiB blocks, like one layer's activations
    del x, y, z
    per_step.append(faults() - before)
print(json.dumps({"applied": applied, "faults": per_step}))
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
    # Untouched, every step maps its three blocks afresh. Tuned, the heap grows over the first steps (a freed
    # block can be a few bytes short of the next aligned request) until its free space holds a step's
    # working set; how many steps that takes depends on the heap's layout at start (steps 8-23 of 16 runs here
    # remapped 0-3 blocks). From then on a block is mapped again only now and then: steps 16-39 of 12 runs
    # remapped none in 11 and one 64 MiB block in 1, where untouched maps all 72 blocks of those steps.
    assert min(untouched["faults"][1:]) > 0.9 * 3 * pages
    assert sum(tuned["faults"][16:]) <= 2 * pages, tuned["faults"]


@pytest.mark.parametrize(("line", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile", True),
    ("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile", True),
    ("Features\t: fp asimd bf16 i8mm", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni", False),
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, monkeypatch, line, native):
    from detr import runtime

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\n{line}\n\nprocessor\t: 1\n{line}\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    assert runtime.native_bf16("cpu") is native
    assert runtime.cpu_model() == "Some CPU"
    monkeypatch.setattr(runtime, "CPUINFO", tmp_path / "missing")  # not Linux: nothing claimed
    assert runtime.native_bf16("cpu") is False
    assert runtime.cpu_model() == "unknown"


def test_bf16_on_a_cpu_without_bf16_warns(tmp_path, monkeypatch, recwarn):
    import torch

    from detr import runtime

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
    monkeypatch.setattr(runtime, "CPUINFO", cpuinfo)
    with pytest.warns(RuntimeWarning, match="without bf16 instructions"):
        assert runtime.amp_dtype("bf16", "cpu") is torch.bfloat16
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert runtime.amp_dtype("bf16", "cpu") is torch.bfloat16
    assert runtime.amp_dtype("fp32", "cpu") is None
    assert not [w for w in recwarn if "bf16" in str(w.message)]
