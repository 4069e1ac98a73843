"""Results for people and programs: strict JSON files and COCO metric tables.

Metric dicts in memory keep `float("nan")` where COCO has nothing to measure (a class absent from the evaluation set,
no small objects); JSON has no NaN, so every file this package writes turns NaN and infinities into `null`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .evaluation import METRIC_NAMES, class_metric_keys

__all__ = ["format_metrics", "json_safe", "write_json"]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (in nested dicts, lists and tuples) replaced by None, tensors and numpy
    scalars turned into Python numbers."""
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as strict JSON (`null` for NaN, never a bare `NaN`), indented; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def format_metrics(metrics: Mapping[str, Any], id2label: Mapping[int, str], prefix: str = "") -> str:
    """COCO metrics (fractions, keys as `hf_sad.evaluation` returns them, optionally prefixed, e.g. `eval_`) as two
    text tables in percent: the overall figures, then AP per class ("-" where the class had no ground truth)."""

    def value(key: str) -> str:
        number = metrics.get(prefix + key)
        if number is None or (isinstance(number, float) and math.isnan(number)):
            return "-"
        return f"{100 * float(number):.1f}"

    present = [(key, name) for key, name in METRIC_NAMES.items() if prefix + key in metrics]
    lines = ["  ".join(f"{name:>12}" for _, name in present), "  ".join(f"{value(key):>12}" for key, _ in present)]
    keys = class_metric_keys(id2label)
    names = {k: str(id2label[k]) for k in sorted(id2label, key=int)}
    width = max([len("class"), *map(len, names.values())])
    lines += ["", f"{'class':<{width}}  {'AP':>6}", "-" * (width + 8)]
    lines += [f"{name:<{width}}  {value(keys[int(k)]):>6}" for k, name in names.items()]
    return "\n".join(lines)
