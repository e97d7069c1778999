"""PQ statistics: per-category TP / FP / FN / summed IoU, and PQ, SQ, RQ of a group of categories.

Per category c with TP, FP, FN and the summed IoU of its TPs:
``PQ_c = ΣIoU / (TP + ½FP + ½FN)``, ``SQ_c = ΣIoU / TP`` (0 without TP),
``RQ_c = TP / (TP + ½FP + ½FN)``. A group (``All``, ``Things``, ``Stuff``) averages PQ_c, SQ_c,
RQ_c over its categories with TP + FP + FN > 0; ``n`` is their number. **PQ, SQ and RQ are
fractions in [0, 1], not percent.** A group without such a category (``Stuff`` in class-agnostic
mode) reports ``n = 0`` and PQ = SQ = RQ = 0.0. ``tp``, ``fp``, ``fn`` of a group are summed over
its categories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

GROUPS: tuple[tuple[str, Optional[bool]], ...] = (("All", None), ("Things", True), ("Stuff", False))


@dataclass
class CategoryStat:
    """Counts of one category: true positives, false positives, false negatives, summed TP IoU."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def __iadd__(self, other: "CategoryStat") -> "CategoryStat":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


@dataclass
class PQStat:
    """Per-category :class:`CategoryStat` keyed by category id; statistics of images add up (``+``, ``sum``)."""

    per_category: dict[int, CategoryStat] = field(default_factory=dict)

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for cat, stat in other.per_category.items():
            self.per_category.setdefault(cat, CategoryStat()).__iadd__(stat)
        return self

    def __add__(self, other: "PQStat") -> "PQStat":
        out = PQStat()
        out += self
        out += other
        return out

    def __radd__(self, other: Any) -> "PQStat":  # sum(stats) starts from 0
        if other == 0:
            return self + PQStat()
        return NotImplemented

    def category_results(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
                         ) -> dict[int, dict[str, float]]:
        """Category id → ``{"pq", "sq", "rq", "tp", "fp", "fn"}`` for every category of ``categories``."""
        out = {}
        for cat in category_dict(categories):
            s = self.per_category.get(cat, CategoryStat())
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            out[cat] = {"pq": s.iou / denom if denom else 0.0, "sq": s.iou / s.tp if s.tp else 0.0,
                        "rq": s.tp / denom if denom else 0.0, "tp": s.tp, "fp": s.fp, "fn": s.fn}
        return out

    def summary(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
                isthing: Optional[bool] = None) -> dict[str, Any]:
        """``{"pq", "sq", "rq", "tp", "fp", "fn", "n"}`` over ``categories`` (things only if
        ``isthing`` is True, stuff only if False); PQ/SQ/RQ are fractions averaged over the ``n``
        categories with TP + FP + FN > 0 (0.0 when ``n == 0``)."""
        cats = category_dict(categories)
        chosen = [c for c, info in cats.items() if isthing is None or (int(info.get("isthing", 0)) == 1) == isthing]
        per = self.category_results({c: cats[c] for c in chosen})
        present = [r for r in per.values() if r["tp"] + r["fp"] + r["fn"] > 0]
        n = len(present)
        out = {k: (sum(r[k] for r in present) / n if n else 0.0) for k in ("pq", "sq", "rq")}
        out.update({k: int(sum(r[k] for r in per.values())) for k in ("tp", "fp", "fn")})
        out["n"] = n
        return out

    def groups(self, categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
               ) -> dict[str, dict[str, Any]]:
        """``{"All": summary, "Things": summary, "Stuff": summary}``."""
        return {name: self.summary(categories, isthing) for name, isthing in GROUPS}



def category_dict(categories: Mapping[int, Mapping[str, Any]] | Sequence[Mapping[str, Any]]
                  ) -> dict[int, Mapping[str, Any]]:
    """Categories as ``{id: category}``, from that mapping or from a JSON list of ``{"id", ...}``."""
    if isinstance(categories, Mapping):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}

