"""The distribution detr-pytorch: an sdist that builds a wheel, a wheel with the package, the license and
the `detr` command and nothing else, and an install of it (not the source tree) that runs.

Everything is built from a copy of the checkout (less caches and build outputs), with the setuptools of
this environment and no network; the install is a fresh venv that borrows this environment's site-packages
for torch and the other dependencies (as a path, so that no editable install of the source tree found there
comes along).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import detr

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.relative_to(REPO / "src").as_posix() for p in (REPO / "src" / "detr").rglob("*.py"))


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """sdist (setuptools' PEP 517 hook, as `python -m build --sdist` calls it), then the wheel built from it."""
    source = tmp_path_factory.mktemp("checkout") / "detr"
    skip = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache", "outputs",
            "runs")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skip))
    out = tmp_path_factory.mktemp("dist")
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", hook, out], cwd=source).stdout.strip().splitlines()[-1]
    sdist = out / name
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--wheel-dir", out, sdist])
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_holds_the_sources_and_the_license(dist):
    assert dist["sdist"].name == f"detr_pytorch-{detr.__version__}.tar.gz"
    with tarfile.open(dist["sdist"]) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
        license_text = archive.extractfile(f"detr_pytorch-{detr.__version__}/LICENSE").read()
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= names
    assert {n for n in names if n.startswith("src/detr/") and n.endswith(".py")} == {f"src/{s}" for s in SOURCES}
    assert not [n for n in names if n.startswith(("tests", "benchmarks", "docs")) or "conftest" in n]
    assert license_text == (REPO / "LICENSE").read_bytes()


def test_wheel_metadata(dist):
    wheel = dist["wheel"]
    assert wheel.name == f"detr_pytorch-{detr.__version__}-py3-none-any.whl"
    info = f"detr_pytorch-{detr.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        scripts = configparser.ConfigParser()
        scripts.read_string(archive.read(f"{info}/entry_points.txt").decode())
        license_text = archive.read(f"{info}/licenses/LICENSE")
        top_level = archive.read(f"{info}/top_level.txt").decode().split()
    assert metadata["Name"] == "detr-pytorch" and metadata["Version"] == detr.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == ">=3.10" and metadata["Author"] == "detr-pytorch contributors"
    classifiers = set(metadata.get_all("Classifier"))
    assert {"Development Status :: 4 - Beta", "Operating System :: OS Independent",
            "Programming Language :: Python :: 3.10", "Programming Language :: Python :: 3.11",
            "Programming Language :: Python :: 3.12",
            "Topic :: Scientific/Engineering :: Artificial Intelligence"} <= classifiers
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Repository", "Issues"} and "detr" in metadata["Keywords"].split(",")
    requires = metadata.get_all("Requires-Dist")
    assert "torch>=2.2" in requires and not any("torchvision" in r for r in requires)
    assert metadata["Description-Content-Type"] == "text/markdown" and "DETR" in metadata.get_payload()
    # the command, the license, the package (every module of src/detr) and nothing else
    assert scripts["console_scripts"]["detr"].startswith("detr.")
    assert license_text == (REPO / "LICENSE").read_bytes() and license_text.lstrip().startswith(b"Apache License")
    assert b"Version 2.0, January 2004" in license_text and b"END OF TERMS AND CONDITIONS" in license_text
    assert top_level == ["detr"]
    assert sorted(n for n in names if n.endswith(".py")) == SOURCES
    assert {f"detr/serve/static/{f}" for f in ("index.html", "explorer.js", "explorer.css")} <= names  # detr serve
    assert {n.split("/")[0] for n in names} == {"detr", info}


def test_the_installed_wheel_runs(dist, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # no source tree
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], env=env)
    python = venv / "bin" / "python"
    packages = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        env=env).stdout.strip())
    # torch & co. from this environment: its site-packages as plain paths, after the venv's own
    (packages / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet",
         dist["wheel"]], env=env)
    assert {p.name for p in packages.iterdir()} == {"borrowed.pth", "detr", dist["wheel"].name.split("-py3")[0]
                                                    + ".dist-info"}
    elsewhere = tmp_path / "elsewhere"  # not the repository: no src/ nearby
    elsewhere.mkdir()

    usage = run([venv / "bin" / "detr", "--help"], env=env, cwd=elsewhere).stdout
    assert usage.startswith("usage: detr") and all(cmd in usage for cmd in ("train", "eval", "predict", "convert"))

    smoke = r"""
import importlib.metadata, json, sys, torch
import detr, detr.cli
from detr import build_detr, preset
config = preset("shapes-small", num_queries=3).with_transformer(enc_layers=1, dec_layers=1)
torch.manual_seed(0)
model = build_detr(config).eval()
with torch.no_grad():
    out = model([torch.rand(3, 64, 80), torch.rand(3, 48, 64)])
print(json.dumps({"file": detr.__file__, "cli": detr.cli.__file__, "logits": list(out["pred_logits"].shape),
                  "boxes": list(out["pred_boxes"].shape), "finite": bool(out["pred_boxes"].isfinite().all()),
                  "version": importlib.metadata.version("detr-pytorch"), "path": sys.path}))
"""
    report = json.loads(run([python, "-c", smoke], env=env, cwd=elsewhere).stdout)
    assert Path(report["file"]).is_relative_to(packages) and Path(report["cli"]).is_relative_to(packages)
    assert not any(Path(p).resolve() == (REPO / "src").resolve() for p in report["path"] if p)
    assert report["logits"] == [2, 3, 5] and report["boxes"] == [2, 3, 4] and report["finite"]
    assert report["version"] == detr.__version__
