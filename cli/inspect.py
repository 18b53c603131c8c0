"""``archpass inspect``: what archpass sees in a model (and, with --target, what it costs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from archpass.cli.common import DebugOpt, InputShapeOpt, JsonOpt, format_shapes, handled, print_json, stdout


def _fmt_hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


def render(doc: dict, all_layers: bool = True) -> None:
    t = doc["totals"]
    stdout.print(f"[bold]{doc['model']['path']}[/bold]  sha256 {doc['model']['sha256'][:12]}")
    stdout.print("inputs: " + ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in doc["inputs"])
                 + "   outputs: " + ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in doc["outputs"]))
    if doc["blocks"]:
        bt = Table(title="Blocks", title_justify="left")
        for c in ("id", "kind", "stage", "residual", "layers"):
            bt.add_column(c)
        for b in doc["blocks"]:
            roles = b.get("roles", {})
            bt.add_row(b["id"], b["kind"], str(b["stage"]), "yes" if b["residual"] else "",
                       ", ".join(f"{r}" for r in roles) or str(len(b["layers"])))
        stdout.print(bt)
    lt = Table(title="Layers", title_justify="left")
    for c in ("id", "op", "cin", "cout", "k", "s", "groups", "in", "out", "act", "MMACs", "params", "group"):
        lt.add_column(c, justify="right" if c in ("cin", "cout", "groups", "MMACs", "params") else "left")
    for l in doc["layers"]:
        lt.add_row(_short(l["id"]), l["op"], str(l["cin"]), str(l["cout"]), _fmt_hw(l["kernel"]), _fmt_hw(l["stride"]),
                   str(l["groups"]), _fmt_hw(l["in_hw"]), _fmt_hw(l["out_hw"]), l["activation"] or "",
                   f"{l['macs'] / 1e6:.2f}", str(l["params"]), l["out_group"])
    stdout.print(lt)
    gt = Table(title="Channel groups", title_justify="left")
    for c in ("id", "channels", "adjustable", "producers", "consumers", "why fixed"):
        gt.add_column(c)
    for g in doc["channel_groups"]:
        gt.add_row(g["id"], str(g["channels"]), "yes" if g["adjustable"] else "no", str(len(g["producers"])),
                   str(len(g["consumers"])), g["reason"] or "")
    stdout.print(gt)
    if doc.get("rewrites"):
        rt = Table(title="Applied rewrites", title_justify="left")
        for c in ("#", "pass", "site", "choice", "exact", "before", "after"):
            rt.add_column(c)
        for i, r in enumerate(doc["rewrites"]):
            choice = ", ".join(f"{k}={v}" for k, v in (r.get("choice") or {}).items())
            rt.add_row(str(i), r["pass"], str(r.get("site") or ""), choice, "exact" if r.get("exact") else "lossy",
                       format_shapes(r.get("before")), format_shapes(r.get("after")))
        stdout.print(rt)
        rec = doc.get("record") or {}
        stdout.print(f"source sha256 {str(rec.get('source_sha256'))[:12]}  archpass {rec.get('version')}")
    if "estimate" in doc:
        e = doc["estimate"]
        kt = Table(title=f"Kernels on target {doc['target']}", title_justify="left")
        for c in ("#", "kernel", "layers", "latency ms"):
            kt.add_column(c)
        for i, k in enumerate(e.get("kernels", [])):
            kt.add_row(str(i), str(k.get("kind", k.get("op", ""))), _short(", ".join(k.get("layers", [])), 50),
                       f"{k.get('latency_ms', 0):.4f}")
        stdout.print(kt)
        stdout.print(f"latency {e['latency_ms']:.3f} ms   params {e['params_bytes'] / 1e6:.2f} MB   "
                     f"peak activations {e['peak_activation_bytes'] / 1e6:.2f} MB   MACs {e['macs'] / 1e6:.1f} M")
        for note in e.get("notes", []):
            stdout.print(f"note: {note}", soft_wrap=True, highlight=False)
    unsup = doc.get("unsupported_ops") or []
    stdout.print(
        f"totals: {t['layers']} layers, {t['blocks']} blocks, {t['stages']} stages, {t['channel_groups']} channel groups "
        f"({t['adjustable_groups']} adjustable), {t['macs'] / 1e6:.1f} M MACs, {t['params'] / 1e6:.2f} M params"
        + (f"; not rewritable through: {', '.join(unsup)}" if unsup else "")
    )


def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to analyze.", show_default=False)],
    input_shape: InputShapeOpt = None,
    target: Annotated[str | None, typer.Option("--target", help="Estimate latency and memory on this target (see `archpass targets`).")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the layers, blocks, stages and channel groups of MODEL, and any rewrites archpass applied to it."""
    from archpass import api

    with handled(debug):
        doc = api.inspect(model, input_shape, target=target)
    if json_out:
        print_json(doc)
    else:
        render(doc)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
