"""The seed papers' segmentation tables: init x architecture x fraction, mean ± sd over seeds,
Welch p against ImageNet (else random), in-domain beside out-of-domain, and Dice vs fraction.

Each run folder of `mil seg train` gives one record per evaluation set: ``test`` (in-domain)
and every ``ood:<folder>``. The set rides in the record's ``method`` (``unet test``,
``unet ood:dark``), so :func:`analysis.records.compare_records` tests inits only within one
architecture and one evaluation set. Level (``minus``) is 0: a U-Net uses the whole encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mil.seg.errors import SegError

METRICS = ("dice", "iou", "object_dice", "aji", "pixel_accuracy")


def _init(cfg: dict) -> str:
    prov = cfg.get("encoder_provenance") or {}
    kind = prov.get("weights_kind")
    return "random" if kind == "random" else str(prov.get("weights") or cfg.get("weights"))


def read_seg_records(paths: Sequence[str | Path]) -> list[dict]:
    """Records of `mil seg train` run folders (or folders holding them), one per evaluation set."""
    runs: list[Path] = []
    for p in map(Path, paths):
        runs += [p] if (p / "metrics.json").is_file() else sorted(q.parent for q in p.glob("*/metrics.json"))
    records = []
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        if cfg.get("kind") != "segmentation":
            continue
        for name, m in json.loads((run / "metrics.json").read_text()).items():
            records.append({"encoder": cfg["encoder"], "weights": _init(cfg), "minus": 0,
                            "fraction": float(cfg["fraction"]), "seed": int(cfg["seed"]),
                            "method": f"{cfg['arch']} {name}", "run": str(run),
                            **{k: m.get(k) for k in METRICS}})
    if not records:
        raise SegError(f"no segmentation runs (config.json + metrics.json) under {', '.join(map(str, paths))}")
    return records


def compare_seg(records: Sequence[dict], out: str | Path, baseline: str | None = None) -> dict[str, Path]:
    """table.md / table.csv and dice_vs_fraction.png in *out*; baseline: imagenet if present, else random."""
    from analysis.records import compare_records, plot_metric_vs_fraction, write_csv, write_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inits = {r["weights"] for r in records}
    base = baseline or ("imagenet" if "imagenet" in inits else "random" if "random" in inits else None)
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in records)]
    rows = compare_records(records, metrics=metrics, baseline=base)
    return {"table_md": write_markdown(rows, out / "table.md", title="Segmentation transfer"),
            "table_csv": write_csv(rows, out / "table.csv"),
            "dice_plot": plot_metric_vs_fraction(records, "dice", out / "dice_vs_fraction.png", baseline=base)}


__all__ = ["METRICS", "compare_seg", "read_seg_records"]
