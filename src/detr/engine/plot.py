"""``detr plot LOG``: training curves from a log.jsonl (matplotlib, the [viz] extra)."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of a JSON-lines training log; bad lines name their number."""
    steps, epochs = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        (epochs if record.get("type") == "epoch" else steps).append(record)
    return steps, epochs


def plot_log(path: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss terms per step and AP per epoch into one PNG (default: next to the log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("detr plot needs matplotlib: pip install 'detr-pytorch[viz]'") from e
    steps, epochs = read_log(path)
    if not steps and not epochs:
        raise ValueError(f"{path}: no records to plot")
    out = Path(out) if out else Path(path).with_suffix(".png")
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [r["step"] for r in steps]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        if steps and key in steps[0]:
            ax_loss.plot(x, [r[key] for r in steps], label=key, linewidth=1)
    ax_loss.set_xlabel("step")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training losses (final decoder layer)")
    ax_loss.legend()
    evaluated = [r for r in epochs if "bbox_AP" in r]
    for key in ("bbox_AP", "bbox_AP50", "segm_AP"):
        if evaluated and key in evaluated[0]:
            ax_ap.plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], marker="o", label=key)
    ax_ap.set_xlabel("epoch")
    ax_ap.set_title("COCO AP")
    ax_ap.set_ylim(0, 1)
    ax_ap.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
