"""Plain-text rendering of a compression report (see ``MPOModel.compression_report``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tnlm.core.table import format_table

__all__ = ["format_report", "report_totals"]


def report_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    central = sum(r["central_params"] for r in rows)
    return dict(modules=len(rows), params_before=before, params_after=after,
                ratio=after / before if before else 0.0,
                central_fraction=central / after if after else 0.0)


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """A table: module, shape, site shapes, bond dims, parameters, error, central-bond entropy."""
    head = ("module", "I x J", "in_shape", "out_shape", "bond_dims", "params", "dense", "err",
            "S_max")
    table = [head]
    for r in rows:
        table.append((r["name"], f"{r['shape'][0]}x{r['shape'][1]}",
                      "x".join(map(str, r["in_shape"])), "x".join(map(str, r["out_shape"])),
                      ",".join(map(str, r["bond_dims"])), f"{r['params_after']:,}",
                      f"{r['params_before']:,}", f"{r['truncation_error']:.3f}",
                      f"{max(r['entropy'], default=0.0):.2f}"))
    lines = format_table(table, left=1)
    t = report_totals(rows)
    lines.append(f"{t['modules']} MPO modules: {t['params_after']:,} parameters for "
                 f"{t['params_before']:,} dense ({t['ratio']:.1%}); central tensors hold "
                 f"{t['central_fraction']:.1%}")
    return "\n".join(lines)
