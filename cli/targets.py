"""``archpass targets``: the targets archpass can estimate for, and how accurate each is."""

from __future__ import annotations

from typing import Annotated

import typer
from archpass.cli.common import DebugOpt, JsonOpt, handled, id_column, print_json, stdout
from archpass.cli.common import table as make_table


def _fmt_pct(v) -> str:
    return f"{v:.1f}%" if isinstance(v, (int, float)) else "-"


def targets(
    target: Annotated[list[str] | None, typer.Argument(help="Also list these target directories (paths).", show_default=False)] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the built-in targets (and any target directories given) with their parallelism,
    measurement source, clock and held-out accuracy."""
    from archpass.costmodel import list_targets, load_target

    with handled(debug):
        found = list_targets() + [load_target(t) for t in target or []]
    docs = []
    for t in found:
        d = t.summary()
        acc = t.accuracy or {}
        d["heldout_accuracy"] = {
            "kernels": acc.get("all_kernels"),
            "chains": acc.get("chains"),
            "per_kind": acc.get("kernels"),
            "measured_points": acc.get("measured_points"),
            "failed_jobs": acc.get("failed_jobs"),
        }
        docs.append(d)
    if json_out:
        print_json({"targets": docs})
        return
    table = make_table("Targets")
    numeric = ("parallelism", "points", "kernels ±10%", "kernels MAPE", "networks ±10%")
    id_column(table, "name", [d["name"] for d in docs])  # names users pass to --target: never cut
    for c in ("parallelism", "source", "clock", "dtype", "points", "kernels ±10%", "kernels MAPE", "networks ±10%",
              "description"):
        table.add_column(c, justify="right" if c in numeric else "left", overflow="fold")
    for d in docs:
        k = d["heldout_accuracy"]["kernels"] or {}
        detail = d["source_detail"]
        src = d["source"] + (f" ({detail.get('provider')}, {detail.get('threads')} thr)" if d["source"] == "onnxruntime" else "")
        table.add_row(d["name"], str(d["parallelism"]), src,
                      f"{d['clock_hz'] / 1e6:.0f} MHz" if d["clock_hz"] else "-", d["dtype"],
                      str(d["heldout_accuracy"]["measured_points"] or "-"), _fmt_pct(k.get("within_10pct")),
                      _fmt_pct(k.get("mape_pct")), _fmt_pct((d["heldout_accuracy"]["chains"] or {}).get("within_10pct")),
                      d["description"])
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command("targets")(targets)
