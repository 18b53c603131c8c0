"""``archpass targets``: the targets archpass can estimate for (built-in and in the per-user
target folder), how accurate each is, and which user target stands for a name on this host."""

from __future__ import annotations

from typing import Annotated

import typer
from archpass.cli.common import DebugOpt, JsonOpt, handled, id_column, print_json, stderr, stdout
from archpass.cli.common import table as make_table


def _fmt_pct(v) -> str:
    return f"{v:.1f}%" if isinstance(v, (int, float)) else "-"


def targets(
    target: Annotated[list[str] | None, typer.Argument(help="Also list these target directories (paths).", show_default=False)] = None,
    set_default: Annotated[str | None, typer.Option("--set-default", help="NAME=USER_TARGET: on this host, NAME (e.g. cpu) means the user target USER_TARGET.", show_default=False)] = None,
    unset_default: Annotated[str | None, typer.Option("--unset-default", help="NAME: NAME means the built-in target again on this host.", show_default=False)] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List the built-in targets, the user targets (in $ARCHPASS_TARGETS, default
    ~/.config/archpass/targets) and any target directories given, with their parallelism,
    measurement source, clock, held-out accuracy and whether they were measured on this host."""
    from archpass.costmodel import list_targets, load_target
    from archpass.costmodel.host import same_machine
    from archpass.costmodel.target import defaults_here
    from archpass.costmodel.target import set_default as _set_default
    from archpass.costmodel.target import user_dir
    from archpass.errors import TargetError

    with handled(debug):
        if set_default is not None:
            name, sep, user_target = set_default.partition("=")
            if not sep or not name or not user_target:
                raise TargetError(f"--set-default {set_default!r} is not NAME=USER_TARGET", "e.g. --set-default cpu=cpu-here")
            path = _set_default(name.strip(), user_target.strip())
            stderr.print(f"'{name.strip()}' now means user target {user_target.strip()} on this host ({path})")
        if unset_default is not None:
            path = _set_default(unset_default.strip(), None)
            stderr.print(f"'{unset_default.strip()}' means the built-in target again on this host ({path})")
        broken: list[str] = []
        found = list_targets(broken) + [load_target(t) for t in target or []]
        for line in broken:
            stderr.print(f"warning: {line}", soft_wrap=True)
        defaults = defaults_here()
    stands_for = {}
    for name, user_target in defaults.items():
        stands_for.setdefault(user_target, []).append(name)
    docs = []
    for t in found:
        d = t.summary()
        d["default_here_for"] = sorted(stands_for.get(t.name, [])) if t.origin == "user" else []
        d["this_host"] = same_machine(t.source.get("host")) if t.backend == "onnxruntime" else None
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
        print_json({"targets": docs, "user_dir": str(user_dir()), "defaults_here": defaults})
        return
    table = make_table("Targets")
    numeric = ("parallelism", "points", "kernels ±10%", "kernels MAPE", "networks ±10%")
    id_column(table, "name", [d["name"] for d in docs])  # names users pass to --target: never cut
    for c in ("origin", "parallelism", "source", "clock", "dtype", "points", "kernels ±10%", "kernels MAPE",
              "networks ±10%", "host", "description"):
        table.add_column(c, justify="right" if c in numeric else "left", overflow="fold")
    for d in docs:
        k = d["heldout_accuracy"]["kernels"] or {}
        detail = d["source_detail"]
        src = d["source"] + (f" ({detail.get('provider')}, {detail.get('threads')} thr)" if d["source"] == "onnxruntime" else "")
        origin = d["origin"] + (f" (default for {', '.join(d['default_here_for'])})" if d["default_here_for"] else "")
        host = {True: "this", False: "other", None: "-"}[d["this_host"]]
        table.add_row(d["name"], origin, str(d["parallelism"]), src,
                      f"{d['clock_hz'] / 1e6:.0f} MHz" if d["clock_hz"] else "-", d["dtype"],
                      str(d["heldout_accuracy"]["measured_points"] or "-"), _fmt_pct(k.get("within_10pct")),
                      _fmt_pct(k.get("mape_pct")), _fmt_pct((d["heldout_accuracy"]["chains"] or {}).get("within_10pct")),
                      host, d["description"])
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command("targets")(targets)
