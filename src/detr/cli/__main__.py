"""``python -m detr.cli``: the ``detr`` command."""

from . import run

raise SystemExit(run())
