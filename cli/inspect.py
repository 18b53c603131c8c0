"""``archpass inspect``: what archpass sees in a model (and, with --target, what it costs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from archpass.cli.common import (DebugOpt, InputShapeOpt, JsonOpt, handled, id_column, print_json,
                                 print_table, rewrites_table, stderr, stdout, table)
from archpass.structure import macs_text


def _fmt_hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}"


def _kernel(l: dict) -> str:
    """Kernel, stride and grouping in one short cell: ``3x3/2 dw``, ``1x1``, ``3x3 g4``."""
    k = _fmt_hw(l["kernel"]) + (f"/{l['stride'][0]}" if l["stride"][0] == l["stride"][1] and l["stride"][0] != 1
                                else "" if l["stride"] == [1, 1] else f"/{_fmt_hw(l['stride'])}")
    if l["groups"] > 1:
        k += " dw" if l["groups"] == l["cin"] else f" g{l['groups']}"
    return k


def _layers_table(doc: dict, wide: bool) -> Table:
    ls = doc["layers"]
    if wide:
        cols = {"id": [l["id"] for l in ls], "op": [l["op"] for l in ls], "cin": [str(l["cin"]) for l in ls],
                "cout": [str(l["cout"]) for l in ls], "k": [_fmt_hw(l["kernel"]) for l in ls],
                "s": [_fmt_hw(l["stride"]) for l in ls], "groups": [str(l["groups"]) for l in ls],
                "in": [_fmt_hw(l["in_hw"]) for l in ls], "out": [_fmt_hw(l["out_hw"]) for l in ls],
                "act": [l["activation"] or "" for l in ls], "MMACs": [f"{l['macs'] / 1e6:.2f}" for l in ls],
                "params": [str(l["params"]) for l in ls], "group": [l["out_group"] for l in ls]}
    else:
        cols = {"id": [l["id"] for l in ls], "channels": [f"{l['cin']}→{l['cout']}" for l in ls],
                "kernel": [_kernel(l) for l in ls], "group": [l["out_group"] for l in ls]}
    lt = table("Layers" + ("" if wide else " (--wide for every column)"))
    for name, values in cols.items():
        id_column(lt, name, values, "right" if name in ("cin", "cout", "groups", "MMACs", "params", "channels") else "left")
    for row in zip(*cols.values()):
        lt.add_row(*row)
    return lt


def render(doc: dict, wide: bool = False) -> None:
    t = doc["totals"]
    stdout.print(f"[bold]{doc['model']['path']}[/bold]  sha256 {doc['model']['sha256'][:12]}", crop=False)
    stdout.print("inputs: " + ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in doc["inputs"])
                 + "   outputs: " + ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in doc["outputs"]), crop=False)
    if doc["blocks"]:
        bt = table("Blocks")
        id_column(bt, "id", [b["id"] for b in doc["blocks"]])
        for c in ("kind", "stage", "residual", "layers"):
            bt.add_column(c, overflow="fold")
        for b in doc["blocks"]:
            roles = b.get("roles", {})
            bt.add_row(b["id"], b["kind"], str(b["stage"]), "yes" if b["residual"] else "",
                       ", ".join(f"{r}" for r in roles) or str(len(b["layers"])))
        print_table(bt)
    print_table(_layers_table(doc, wide))
    gt = table("Channel groups")
    id_column(gt, "id", [g["id"] for g in doc["channel_groups"]])
    for c in ("channels", "adjustable", "producers", "consumers", "why fixed"):
        gt.add_column(c, justify="right" if c in ("channels", "producers", "consumers") else "left",
                      no_wrap=c != "why fixed", overflow="fold")
    for g in doc["channel_groups"]:
        gt.add_row(g["id"], str(g["channels"]), "yes" if g["adjustable"] else "no", str(len(g["producers"])),
                   str(len(g["consumers"])), g["reason"] or "")
    print_table(gt)
    if doc.get("rewrites"):
        print_table(rewrites_table(doc["rewrites"], "Applied rewrites"))
        rec = doc.get("record") or {}
        stdout.print(f"source sha256 {str(rec.get('source_sha256'))[:12]}  archpass {rec.get('version')}")
    if "estimate" in doc:
        e = doc["estimate"]
        kt = table(f"Kernels on target {doc['target']}")
        kt.add_column("#", justify="right", no_wrap=True)
        kt.add_column("kernel", no_wrap=True)
        # one layer id per line: ids are never cut
        id_column(kt, "layers", [x for k in e.get("kernels", []) for x in k.get("layers", [])])
        kt.add_column("latency ms", justify="right", no_wrap=True)
        for i, k in enumerate(e.get("kernels", [])):
            kt.add_row(str(i), str(k.get("kind", k.get("op", ""))), "\n".join(k.get("layers", [])),
                       f"{k.get('latency_ms', 0):.4f}")
        print_table(kt)
        stdout.print(f"latency {e['latency_ms']:.3f} ms   params {e['params_bytes'] / 1e6:.2f} MB   "
                     f"peak activations {e['peak_activation_bytes'] / 1e6:.2f} MB   MACs {macs_text(e['macs'])}")
        m = e.get("measured")
        if m:
            n, slow = len(m["windows_ms"]), m.get("slow_state_windows", 0)
            how = (f"the faster half of {n} window{'s' if n > 1 else ''}" if not slow
                   else f"the faster half of the {n - slow} fast-state windows of {n}")
            stdout.print(f"measured on this host: {m['ms']:.3f} ms ({how}, {m['threads']} thread"
                         f"{'s' if m['threads'] > 1 else ''}, graph optimizations {m['graph_optimization']}); "
                         f"the prediction is {m['error_pct']:+.1f}% off")
        for note in e.get("notes", []):
            if note not in doc.get("notes", []):  # printed below
                stdout.print(f"note: {note}")
    for note in doc.get("notes", []):
        stdout.print(f"note: {note}")
    unsup = doc.get("unsupported_ops") or []
    stdout.print(
        f"totals: {t['layers']} layers, {t['blocks']} blocks, {t['stages']} stages, {t['channel_groups']} channel groups "
        f"({t['adjustable_groups']} adjustable), {macs_text(t['macs'])} MACs, {t['params'] / 1e6:.2f} M params"
        + (f"; not rewritable through: {', '.join(unsup)}" if unsup else "")
    )


def inspect(
    model: Annotated[Path, typer.Argument(help="The ONNX model to analyze.", show_default=False)],
    input_shape: InputShapeOpt = None,
    target: Annotated[str | None, typer.Option("--target", help="Estimate latency and memory on this target (see `archpass targets`).")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Every column of the Layers table (op, in/out size, activation, MACs, params).")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="With an onnxruntime --target: also time MODEL on this host as the target runs it (threads, provider, graph optimizations; interleaved windows, a busy or slowed host waited for) and show how far the prediction is.")] = False,
    windows: Annotated[int, typer.Option("--windows", help="--measure: timing windows (each at least 10 runs and 0.15 s).")] = 5,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show the layers, blocks, stages and channel groups of MODEL, and any rewrites archpass applied to it."""
    from archpass import api

    with handled(debug):
        doc = api.inspect(model, input_shape, target=target, measure=measure, windows=windows,
                          progress=(lambda msg: stderr.print(f"measure: {msg}")) if measure else None)
    if json_out:
        print_json(doc)
    else:
        render(doc, wide)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
