"""``detr`` command line: train | eval | demo | plot | predict | attention | export | convert | data |
eval-panoptic | serve. The only argparse code of the package; each subcommand is a thin call into the Python API.

Flag names follow the reference implementation's main.py where it has one (``--coco_path --batch_size
--lr --lr_backbone --lr_drop --epochs ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import data, export, inference, serve, train
from .flags import add_data_flags, add_model_flags, model_config_from_args

__all__ = ["add_data_flags", "add_model_flags", "build_parser", "main", "model_config_from_args", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr", description="DETR: train, evaluate and run detectors")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (train, inference, export, data, serve):
        commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import DownloadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run() -> int:
    """The ``detr`` console script: :func:`main` in a process tuned for large tensors (see detr.runtime)."""
    from ..runtime import keep_freed_memory

    keep_freed_memory()
    return main()
