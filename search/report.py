"""Reports: what a search found, as data, Markdown, plots and one self-contained HTML page.

:class:`ReportData` is pure data (frozen): the baseline and best estimates, per-block
latency before and after, the chosen recipe, every trial (number, state, objective
values, estimate, fidelity/proxy, feasibility and why not, the user evaluator's metrics
or failure with its stderr tail), and the seed recipes' resolution.  It is built either
from a finished run (:func:`build_report`) or from a stored study
(:func:`report_from_study`, for ``archpass report`` on a study many workers ran), and
:func:`write_report` writes::

    report.json   the data, machine-readable
    report.md     headline table, recipe, trials, failures (links the PNGs)
    trials.png    every trial's objective against fidelity/proxy (or memory), Pareto front marked
    blocks.png    per-block latency before and after
    history.png   the optimization history (objective per trial, best so far)
    report.html   all of the above in one file: images embedded as data: URIs, inline CSS,
                  no script, no network access; readable offline and attachable to a review

Trial attributes read from a study (set by :mod:`archpass.search.objective`):
``recipe``, ``estimate`` (latency_ms, params_bytes, peak_activation_bytes, macs),
``invalid`` (why the passes refused the recipe), ``constraints`` (<= 0: met),
``guard`` (kind, score, threshold, ok, error), ``evaluator`` (the evaluator's result or
failure, :mod:`archpass.search.evaluator`); the study's ``archpass.job`` names the model
and target.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

FILES = ("report.json", "report.md", "trials.png", "blocks.png", "history.png", "report.html")
JOB_ATTR = "archpass.job"
SEED_ATTR = "archpass.seed"  # study attribute: the seed recipes' resolution (SeedEntry.to_json() list)
FINALISTS_ATTR = "archpass.finalists"  # study attribute: the guard's results on finalists
RESULT_ATTR = "archpass.result"  # study attribute: what `archpass optimize` chose (best_trial, guard scores)
OBJECTIVE_UNITS = {"latency": ("latency", "ms"), "memory": ("memory (params + peak activation)", "MB"),
                   "macs": ("MACs", "M")}


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Summary:
    """One model's estimate, as the report shows it."""

    latency_ms: float
    params_bytes: int
    peak_activation_bytes: int
    macs: int

    @property
    def memory_bytes(self) -> int:
        return self.params_bytes + self.peak_activation_bytes

    @classmethod
    def of(cls, d: Mapping[str, Any] | Any) -> "Summary":
        get = d.get if isinstance(d, Mapping) else (lambda k: getattr(d, k))
        return cls(float(get("latency_ms")), int(get("params_bytes")), int(get("peak_activation_bytes")),
                   int(get("macs")))


@dataclass(frozen=True)
class BlockRow:
    """Latency of one block (or the stem/head/other ops) before and after the rewrites."""

    label: str
    before_ms: float
    after_ms: float | None


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    values: tuple[float, ...] | None = None
    estimate: Summary | None = None
    score: float | None = None  # fidelity or proxy, when the guard evaluated this trial
    feasible: bool = False
    reason: str | None = None  # why not feasible / why it failed
    recipe: Mapping[str, Any] | None = None
    metrics: Mapping[str, float] | None = None  # the user evaluator's metrics
    stderr_tail: str | None = None  # the user evaluator's stderr when it failed
    retried_from: int | None = None


@dataclass(frozen=True)
class ReportData:
    model: str
    target: str
    objectives: tuple[str, ...]
    baseline: Summary
    best: Summary | None
    best_trial: int | None
    recipe: Mapping[str, Any]
    trials: tuple[TrialRow, ...] = ()
    blocks: tuple[BlockRow, ...] = ()
    score_kind: str | None = None  # "fidelity" or "proxy"
    baseline_score: float | None = None
    best_score: float | None = None
    seed: tuple[Mapping[str, Any], ...] = ()  # SeedEntry.to_json() of each --seed-recipe rewrite
    storage: str | None = None
    study: str | None = None
    notes: tuple[str, ...] = ()

    def headline(self) -> dict:
        """The figures a reader looks for first (also in report.json)."""
        b, a = self.baseline, self.best or self.baseline
        d = {"latency_ms": [b.latency_ms, a.latency_ms], "memory_bytes": [b.memory_bytes, a.memory_bytes],
             "macs": [b.macs, a.macs], "latency_change_pct": _pct(b.latency_ms, a.latency_ms),
             "memory_change_pct": _pct(b.memory_bytes, a.memory_bytes), "macs_change_pct": _pct(b.macs, a.macs)}
        if self.score_kind:
            d[self.score_kind] = [self.baseline_score, self.best_score]
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.state] = counts.get(t.state, 0) + 1
        d["trials"] = counts
        d["feasible_trials"] = sum(1 for t in self.trials if t.feasible)
        return d

    def to_json(self) -> dict:
        d = asdict(self)
        d["headline"] = self.headline()
        return d


def _pct(before: float, after: float) -> float:
    return 0.0 if not before else round(100.0 * (after - before) / before, 2)


# ---------------------------------------------------------------------------- building
def block_latencies(structure, before, after=None) -> tuple[BlockRow, ...]:
    """Per-block latency from two :class:`~archpass.costmodel.Estimate` s.  Kernels are
    attributed through the *original* structure's nodes (rewrites keep block and layer
    ids), so a fused block is compared with itself; ops outside blocks are ``stem``
    (before the first block), ``head`` (after the last) or ``other``."""
    owner: dict[str, str] = {}
    for b in structure.blocks:
        for lid in b.layers:
            owner[lid] = b.id
        if b.residual_add:
            owner[b.residual_add] = b.id
    order = {n.name: i for i, n in enumerate(structure.nodes)}
    in_blocks = [order[n] for n in owner if n in order]
    first, last = (min(in_blocks), max(in_blocks)) if in_blocks else (0, -1)

    def label(kernel) -> str:
        for n in kernel.nodes:
            if n in owner:
                return owner[n]
        pos = [order[n] for n in kernel.nodes if n in order]
        if pos and max(pos) < first:
            return "stem"
        if pos and min(pos) > last:
            return "head"
        return "other"

    def sums(est) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in est.kernels:
            lab = label(k.kernel)
            out[lab] = out.get(lab, 0.0) + k.latency_ms
        return out

    b = sums(before)
    a = sums(after) if after is not None else {}
    labels = ["stem"] + [blk.id for blk in structure.blocks] + ["head", "other"]
    return tuple(BlockRow(l, b.get(l, 0.0), a.get(l, 0.0) if after is not None else None)
                 for l in labels if l in b or l in a)


def _state(trial) -> str:
    return trial.state.name


def trial_row(trial) -> TrialRow:
    """A stored Optuna ``FrozenTrial`` as a report row (attribute names: module doc)."""
    a = trial.user_attrs
    est = Summary.of(a["estimate"]) if a.get("estimate") else None
    guard = a.get("guard") or {}
    ev = a.get("evaluator") or {}
    cons = a.get("constraints")
    state = _state(trial)
    reasons = []
    if a.get("invalid"):
        reasons.append(str(a["invalid"]))
    if guard and not guard.get("ok", True):
        reasons.append(guard.get("error") or f"{guard.get('kind')} {guard.get('score'):.4g} < {guard.get('threshold'):.4g}")
    if ev and not ev.get("ok", True):
        reasons.append(str(ev.get("reason")))
    if ev.get("unmet"):
        reasons.append("; ".join(ev["unmet"]))
    if cons and not reasons and any(c > 0 for c in cons):
        reasons.append("over budget")
    if state == "FAIL" and not reasons:
        reasons.append(str(trial.system_attrs.get("fail_reason") or "trial failed (worker lost or error)"))
    feasible = state == "COMPLETE" and est is not None and not reasons and all(c <= 0 for c in (cons or ()))
    retried = trial.system_attrs.get("failed_trial")
    return TrialRow(
        number=trial.number, state=state, values=tuple(trial.values) if trial.values else None, estimate=est,
        score=guard.get("score") if guard else None, feasible=feasible, reason="; ".join(reasons) or None,
        recipe=a.get("recipe"), metrics=ev.get("metrics"), stderr_tail=ev.get("stderr_tail") if not ev.get("ok", True) else None,
        retried_from=int(retried) if retried is not None and retried != trial.number else None)


def build_report(*, model: str, target: str, objectives: Sequence[str], structure, baseline, best=None,
                 best_trial: int | None = None, recipe=None, trials: Iterable = (), score_kind: str | None = None,
                 baseline_score: float | None = None, best_score: float | None = None, seed: Sequence = (),
                 storage: str | None = None, study: str | None = None, notes: Sequence[str] = (),
                 checked: Sequence[Mapping[str, Any]] = ()) -> ReportData:
    """ReportData from a run's values: ``baseline``/``best`` are Estimates, ``trials``
    FrozenTrials (or TrialRows), ``recipe`` a Recipe or its JSON, ``seed`` SeedEntries or
    their JSON, ``checked`` the guard's results on finalists (``{"number", "kind",
    "score", "ok", ...}``, the search's ``archpass.finalists``), merged into their rows."""
    rows = _merge_checked(tuple(t if isinstance(t, TrialRow) else trial_row(t) for t in trials), checked)
    if checked:
        score_kind = score_kind or checked[0].get("kind")
    rec = recipe.to_json() if hasattr(recipe, "to_json") else (recipe or {"rewrites": []})
    if score_kind is None:
        kinds = {(t.user_attrs.get("guard") or {}).get("kind") for t in trials if not isinstance(t, TrialRow)}
        kinds.discard(None)
        score_kind = kinds.pop() if len(kinds) == 1 else None
    return ReportData(
        model=str(model), target=str(target), objectives=tuple(objectives), baseline=Summary.of(baseline),
        best=Summary.of(best) if best is not None else None, best_trial=best_trial, recipe=rec, trials=rows,
        blocks=block_latencies(structure, baseline, best), score_kind=score_kind, baseline_score=baseline_score,
        best_score=best_score, seed=tuple(s.to_json() if hasattr(s, "to_json") else dict(s) for s in seed),
        storage=storage, study=study, notes=tuple(notes))


def _merge_checked(rows: tuple[TrialRow, ...], checked: Sequence[Mapping[str, Any]]) -> tuple[TrialRow, ...]:
    by_number = {int(c["number"]): c for c in checked}
    return tuple(_with_guard(r, by_number[r.number]) if r.number in by_number else r for r in rows)


def _with_guard(row: TrialRow, g: Mapping[str, Any]) -> TrialRow:
    from dataclasses import replace

    if g.get("ok", True):
        return replace(row, score=g.get("score"))
    why = g.get("error") or f"{g.get('kind')} {g.get('score', float('nan')):.4g} < {g.get('threshold', float('nan')):.4g}"
    return replace(row, score=g.get("score"), feasible=False, reason="; ".join(filter(None, [row.reason, why])))


def _best_row(rows: Sequence[TrialRow], baseline_values: Sequence[float]) -> TrialRow | None:
    """The feasible trial with the lowest first objective, if it is not worse than the
    unchanged model (never slower: otherwise the best is the original)."""
    ok = [t for t in rows if t.feasible and t.values]
    if not ok:
        return None
    best = min(ok, key=lambda t: (t.values[0], t.number))
    return best if best.values[0] <= baseline_values[0] else None


def report_from_study(study, *, storage: str | None = None, structure=None, target=None) -> ReportData:
    """ReportData of a stored study.  The model and target named by the study's
    ``archpass.job`` are loaded to recompute the baseline and the best recipe's
    per-kernel estimate (shapes only); ``structure``/``target`` skip the loading."""
    from archpass.errors import ArchpassError
    from archpass.passes.engine import apply_recipe_shapes
    from archpass.recipe import Recipe

    job = dict(study.user_attrs.get(JOB_ATTR) or {})
    if not job and structure is None:
        raise ArchpassError(f"study '{study.study_name}' was not written by archpass optimize (no {JOB_ATTR} attribute)",
                            "pass the --study-name of an archpass run")
    from archpass.costmodel import estimate, load_target

    if structure is None:
        from archpass.analysis import analyze
        from archpass.model import load_model, parse_input_shapes

        shapes = job.get("input_shapes") or ()
        try:
            structure = analyze(load_model(job["model"], parse_input_shapes(list(shapes)) if shapes else None))
        except ArchpassError as exc:
            raise ArchpassError(f"cannot load the study's model {job.get('model')} ({exc.problem})",
                                "run archpass report where the model file is, at the same path") from None
    tgt = target if target is not None else load_target(job.get("target", "edgetpu"))
    objectives = tuple(job.get("objectives") or ("latency",))
    checked = tuple(study.user_attrs.get(FINALISTS_ATTR) or ())
    rows = _merge_checked(tuple(trial_row(t) for t in study.get_trials(deepcopy=False)), checked)
    base_est = estimate(structure, tgt, best_order=False)
    base = Summary.of({"latency_ms": base_est.latency_ms, "params_bytes": base_est.params_bytes,
                       "peak_activation_bytes": base_est.peak_activation_bytes, "macs": base_est.macs})
    result = study.user_attrs.get(RESULT_ATTR)
    if result is not None:  # what `archpass optimize` chose (Pareto, guard, never slower)
        chosen = next((r for r in rows if r.number == result.get("best_trial")), None)
    else:
        # with a guard run on finalists, the result is the best candidate that passed it
        passed = {int(c["number"]) for c in checked if c.get("ok")}
        pool = [r for r in rows if r.number in passed] if checked else rows
        chosen = _best_row(pool, [_objective(o, base) for o in objectives])
    best_est = recipe = None
    if chosen is not None:
        recipe = Recipe.from_json(chosen.recipe or {"rewrites": []})
        best_est = estimate(apply_recipe_shapes(structure, recipe), tgt, best_order=False)
    kinds = ({(t.user_attrs.get("guard") or {}).get("kind") for t in study.get_trials(deepcopy=False)}
             | {c.get("kind") for c in checked} | {(result or {}).get("score_kind")}) - {None}
    notes = [] if chosen is not None else ["no feasible trial beats the unchanged model: the best is the original"]
    if (result or {}).get("message"):  # the run's own words (e.g. why the guard kept the original)
        notes = [result["message"]]
    return build_report(
        model=job.get("model", "?"), target=getattr(tgt, "name", str(tgt)), objectives=objectives,
        structure=structure, baseline=base_est, best=best_est if best_est is not None else base_est,
        best_trial=chosen.number if chosen else None, recipe=recipe or Recipe(), trials=rows,
        score_kind=kinds.pop() if len(kinds) == 1 else None,
        baseline_score=(result or {}).get("baseline_score"),
        best_score=(result or {}).get("best_score") if result is not None else (chosen.score if chosen else None),
        seed=tuple(study.user_attrs.get(SEED_ATTR) or ()), storage=storage, study=study.study_name, notes=notes)


def _objective(name: str, s: Summary) -> float:
    return {"latency": s.latency_ms, "memory": float(s.memory_bytes), "macs": float(s.macs)}[name]


# ---------------------------------------------------------------------------- plots
def _figure(width: float = 7.5, height: float = 4.2):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _obj_scale(name: str) -> float:
    return {"latency": 1.0, "memory": 1e-6, "macs": 1e-6}[name]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def pareto_front(points: Sequence[tuple[float, float]], maximize_x: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y is minimized; x is
    maximized when ``maximize_x``, minimized otherwise), in order along x."""
    sign = -1.0 if maximize_x else 1.0
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], points[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def plot_trials(data: ReportData) -> bytes:
    """Objective against fidelity/proxy (maximized) when the guard scored trials, else
    against memory; feasible trials, the rest, the Pareto front, baseline and best."""
    obj = data.objectives[0]
    name, unit = OBJECTIVE_UNITS[obj]
    k = _obj_scale(obj)
    use_score = data.score_kind is not None and any(t.score is not None for t in data.trials)
    fig, ax = _figure()
    pts, bad = [], []
    for t in data.trials:
        if t.values is None or t.estimate is None:
            continue
        x = t.score if use_score else t.estimate.memory_bytes / 1e6
        if x is None:
            continue
        (pts if t.feasible else bad).append((float(x), t.values[0] * k))
    if not pts and not bad:
        _empty(ax, "no scored trials")
        return _png(fig)
    if bad:
        ax.scatter(*zip(*bad), s=14, marker="x", color="#bbbbbb", label=f"infeasible ({len(bad)})")
    if pts:
        ax.scatter(*zip(*pts), s=16, color="#4c78a8", alpha=0.7, label=f"feasible ({len(pts)})")
        front = [pts[i] for i in pareto_front(pts, maximize_x=use_score)]
        ax.plot(*zip(*front), color="#e45756", marker="o", ms=5, lw=1.5, label=f"Pareto front ({len(front)})")
    base_x = data.baseline_score if use_score else data.baseline.memory_bytes / 1e6
    if base_x is not None:
        ax.scatter([base_x], [_objective(obj, data.baseline) * k], marker="*", s=180, color="#222",
                   label="original", zorder=5)
    ax.set_xlabel(data.score_kind + " (higher is better)" if use_score else "memory: params + peak activation (MB)")
    ax.set_ylabel(f"{name} ({unit})")
    ax.set_title(f"Trials on {data.target}: {name} against {data.score_kind if use_score else 'memory'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_blocks(data: ReportData) -> bytes:
    fig, ax = _figure(max(7.5, 0.38 * len(data.blocks) + 2), 4.2)
    if not data.blocks:
        _empty(ax, "no per-block latency (the model could not be scored per kernel)")
        return _png(fig)
    xs = range(len(data.blocks))
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [b.before_ms for b in data.blocks], w, color="#9ecae9", label="original")
    if any(b.after_ms is not None for b in data.blocks):
        ax.bar([x + w / 2 for x in xs], [b.after_ms or 0.0 for b in data.blocks], w, color="#4c78a8", label="optimized")
    ax.set_xticks(list(xs), [b.label for b in data.blocks], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"predicted latency on {data.target} (ms)")
    ax.set_title("Per-block latency before and after")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_history(data: ReportData) -> bytes:
    obj = data.objectives[0]
    name, unit = OBJECTIVE_UNITS[obj]
    k = _obj_scale(obj)
    fig, ax = _figure()
    done = [t for t in data.trials if t.values]
    if not done:
        _empty(ax, "no finished trials")
        return _png(fig)
    good = [(t.number, t.values[0] * k) for t in done if t.feasible]
    bad = [(t.number, t.values[0] * k) for t in done if not t.feasible]
    if bad:
        ax.scatter(*zip(*bad), s=10, marker="x", color="#bbbbbb", label="infeasible")
    if good:
        ax.scatter(*zip(*good), s=12, color="#4c78a8", alpha=0.6, label="feasible")
        run, best = [], math.inf
        for n, v in sorted(good):
            best = min(best, v)
            run.append((n, best))
        ax.step(*zip(*run), where="post", color="#e45756", lw=1.8, label="best so far")
    ax.axhline(_objective(obj, data.baseline) * k, color="#222", ls="--", lw=1, label="original")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{name} ({unit})")
    ax.set_title("Optimization history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# ---------------------------------------------------------------------------- text
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _fmt_pct(p: float) -> str:
    return f"{p:+.1f}%"


def headline_rows(data: ReportData) -> list[tuple[str, str, str, str]]:
    """(what, original, optimized, change) rows of the headline table."""
    b, a = data.baseline, data.best or data.baseline
    h = data.headline()
    rows = [("latency", f"{b.latency_ms:.3f} ms", f"{a.latency_ms:.3f} ms", _fmt_pct(h["latency_change_pct"])),
            ("memory (params + peak activation)", _mb(b.memory_bytes), _mb(a.memory_bytes), _fmt_pct(h["memory_change_pct"])),
            ("MACs", f"{b.macs / 1e6:.1f} M", f"{a.macs / 1e6:.1f} M", _fmt_pct(h["macs_change_pct"]))]
    if data.score_kind:
        f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        rows.append((data.score_kind, f(data.baseline_score), f(data.best_score), ""))
    return rows


def _rewrite_text(rw: Mapping[str, Any]) -> str:
    parts = [str(rw.get("pass"))] + ([str(rw["site"])] if rw.get("site") else [])
    parts += [f"{k}={v}" for k, v in rw.items() if k not in ("pass", "site")]
    return " ".join(parts)


def _trial_value(t: TrialRow) -> str:
    return ", ".join(f"{v:.4g}" for v in t.values) if t.values else "-"


def _failures(data: ReportData) -> list[TrialRow]:
    return [t for t in data.trials if t.state == "FAIL" or t.stderr_tail or (t.reason and t.state == "COMPLETE")]


def _top(data: ReportData, n: int = 15) -> list[TrialRow]:
    return sorted((t for t in data.trials if t.feasible and t.values), key=lambda t: (t.values[0], t.number))[:n]


def _seed_no(e: Mapping[str, Any]) -> str:
    """A seed rewrite's number: its index in its recipe, after the recipe's (``--seed-recipe`` order)."""
    return f"{e['file']}:{e['index']}" if "file" in e else str(e["index"])


def render_markdown(data: ReportData) -> str:
    h = data.headline()
    out = [f"# archpass report: {Path(data.model).name} on {data.target}", ""]
    out.append(f"Objective: {', '.join(data.objectives)}.  Trials: "
               + ", ".join(f"{v} {k.lower()}" for k, v in sorted(h["trials"].items()))
               + f" ({h['feasible_trials']} feasible)."
               + (f"  Best: trial {data.best_trial}." if data.best_trial is not None else "  Best: the original model."))
    if data.study:
        out.append(f"Study `{data.study}`" + (f" in `{data.storage}`." if data.storage else "."))
    for n in data.notes:
        out += ["", f"> {n}"]
    out += ["", "| | original | optimized | change |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(data)]
    out += ["", "## Recipe", ""]
    rws = data.recipe.get("rewrites", [])
    out += [f"{i + 1}. `{_rewrite_text(r)}`" for i, r in enumerate(rws)] or ["(no rewrite: the original model)"]
    if data.seed:
        out += ["", "## Seed recipes", "", "| # | rewrite | where | resolved as | note |", "|---|---|---|---|---|"]
        for e in data.seed:
            res = f"`{_rewrite_text(e['resolved'])}`" if e.get("resolved") else "**not resolved**"
            out.append(f"| {_seed_no(e)} | `{_rewrite_text(e['source'])}` | {e['address']} | {res} | {e.get('note', '')} |")
    out += ["", "## Plots", "", "![trials](trials.png)", "", "![per-block latency](blocks.png)", "",
            "![history](history.png)", "", "## Best trials", "",
            f"| trial | {', '.join(data.objectives)} | {data.score_kind or 'score'} | evaluator | rewrites |",
            "|---|---|---|---|---|"]
    for t in _top(data):
        m = ", ".join(f"{k}={v:.4g}" for k, v in (t.metrics or {}).items()) or "-"
        out.append(f"| {t.number} | {_trial_value(t)} | {'-' if t.score is None else f'{t.score:.4f}'} | {m} | "
                   f"{len((t.recipe or {}).get('rewrites', []))} |")
    fails = _failures(data)
    if fails:
        out += ["", "## Failed and infeasible trials", ""]
        for t in fails:
            out.append(f"- trial {t.number} ({t.state.lower()}): {t.reason or 'failed'}"
                       + (f" (retry of trial {t.retried_from})" if t.retried_from is not None else ""))
            if t.stderr_tail:
                out += ["", "  ```", *["  " + l for l in t.stderr_tail.splitlines()], "  ```"]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:2em auto;max-width:1000px;
color:#1d1d1f;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#555;margin-top:0}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f4f6f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.7em 1em;min-width:12em;background:#fafbfc}
.card .k{color:#555;font-size:.85em}.card .v{font-size:1.5em;font-weight:600}.good{color:#1a7f37}.bad{color:#b42318}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.85em}code{font-size:.9em}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(data: ReportData, images: Mapping[str, bytes]) -> str:
    """One self-contained page: inline CSS, images as data: URIs, no script, no external URL."""
    e = html.escape
    h = data.headline()
    b, a = data.baseline, data.best or data.baseline

    def card(label: str, value: str, change: float | None) -> str:
        cls = "" if change is None else (" good" if change < 0 else " bad" if change > 0 else "")
        ch = "" if change is None else f' <span class="{cls.strip()}">({_fmt_pct(change)})</span>'
        return f'<div class="card"><div class="k">{e(label)}</div><div class="v">{e(value)}</div>{ch}</div>'

    cards = [card("latency", f"{b.latency_ms:.3f} → {a.latency_ms:.3f} ms", h["latency_change_pct"]),
             card("memory", f"{_mb(b.memory_bytes)} → {_mb(a.memory_bytes)}", h["memory_change_pct"]),
             card("MACs", f"{b.macs / 1e6:.1f} M → {a.macs / 1e6:.1f} M", h["macs_change_pct"])]
    if data.score_kind and data.best_score is not None:
        cards.append(card(data.score_kind, f"{data.best_score:.4f}", None))
    trials_line = ", ".join(f"{v} {k.lower()}" for k, v in sorted(h["trials"].items()))
    p = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
         f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
         f"<title>archpass report: {e(Path(data.model).name)} on {e(data.target)}</title><style>{_CSS}</style></head><body>",
         f"<h1>archpass report: {e(Path(data.model).name)} on {e(data.target)}</h1>",
         f"<p class=\"sub\">Objective {e(', '.join(data.objectives))}; trials: {e(trials_line)} "
         f"({h['feasible_trials']} feasible); best: "
         + (f"trial {data.best_trial}" if data.best_trial is not None else "the original model")
         + (f"; study <code>{e(data.study)}</code>" if data.study else "") + ".</p>",
         "".join(f'<p class="note">{e(n)}</p>' for n in data.notes),
         '<div class="cards">' + "".join(cards) + "</div>",
         "<table><tr><th></th><th>original</th><th>optimized</th><th>change</th></tr>"]
    p += [f"<tr><td>{e(r[0])}</td><td class=\"num\">{e(r[1])}</td><td class=\"num\">{e(r[2])}</td>"
          f"<td class=\"num\">{e(r[3])}</td></tr>" for r in headline_rows(data)]
    p.append("</table><h2>Recipe</h2>")
    rws = data.recipe.get("rewrites", [])
    p.append("<ol>" + "".join(f"<li><code>{e(_rewrite_text(r))}</code></li>" for r in rws) + "</ol>"
             if rws else "<p>No rewrite: the original model.</p>")
    if data.seed:
        p.append("<h2>Seed recipes</h2><table><tr><th>#</th><th>rewrite</th><th>where</th><th>resolved as</th><th>note</th></tr>")
        for s in data.seed:
            res = f"<code>{e(_rewrite_text(s['resolved']))}</code>" if s.get("resolved") else "<b class=\"bad\">not resolved</b>"
            p.append(f"<tr><td>{_seed_no(s)}</td><td><code>{e(_rewrite_text(s['source']))}</code></td>"
                     f"<td>{e(s['address'])}</td><td>{res}</td><td>{e(s.get('note', ''))}</td></tr>")
        p.append("</table>")
    p.append("<h2>Plots</h2>")
    alts = {"trials.png": "every trial's objective with the Pareto front", "blocks.png": "per-block latency before and after",
            "history.png": "optimization history"}
    for name, png in images.items():
        p.append(f'<figure><img src="{_data_uri(png)}" alt="{e(alts.get(name, name))}"></figure>')
    p.append(f"<h2>Best trials</h2><table><tr><th>trial</th><th>{e(', '.join(data.objectives))}</th>"
             f"<th>{e(data.score_kind or 'score')}</th><th>evaluator</th><th>rewrites</th></tr>")
    for t in _top(data):
        m = ", ".join(f"{k}={v:.4g}" for k, v in (t.metrics or {}).items()) or "-"
        p.append(f"<tr><td>{t.number}</td><td class=\"num\">{e(_trial_value(t))}</td>"
                 f"<td class=\"num\">{'-' if t.score is None else f'{t.score:.4f}'}</td><td>{e(m)}</td>"
                 f"<td class=\"num\">{len((t.recipe or {}).get('rewrites', []))}</td></tr>")
    p.append("</table>")
    fails = _failures(data)
    if fails:
        p.append("<h2>Failed and infeasible trials</h2><ul>")
        for t in fails:
            retry = f" (retry of trial {t.retried_from})" if t.retried_from is not None else ""
            p.append(f"<li>trial {t.number} ({e(t.state.lower())}): {e(t.reason or 'failed')}{retry}"
                     + (f"<pre>{e(t.stderr_tail)}</pre>" if t.stderr_tail else "") + "</li>")
        p.append("</ul>")
    p.append("</body></html>\n")
    return "\n".join(p)


# ---------------------------------------------------------------------------- writing
def render(data: ReportData) -> dict[str, bytes]:
    """Every report file's bytes, by name (see :data:`FILES`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from archpass.errors import ArchpassError

        raise ArchpassError("the report's plots need matplotlib, which is not installed",
                            "pip install 'archpass[plots]'") from None
    images = {"trials.png": plot_trials(data), "blocks.png": plot_blocks(data), "history.png": plot_history(data)}
    return {"report.json": (json.dumps(data.to_json(), indent=2, default=_json_default) + "\n").encode(),
            "report.md": render_markdown(data).encode(), **images,
            "report.html": render_html(data, images).encode()}


def _json_default(o):
    if isinstance(o, Mapping):
        return dict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_report(data: ReportData, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (created when missing), each atomically
    through :mod:`archpass.io` (an unusable folder is one OutputError line)."""
    from archpass.io import check_output_dir, write_atomically

    out = check_output_dir(out_dir, what="report folder")
    files = render(data)
    written = {}
    for name, blob in files.items():
        write_atomically(out / name, lambda tmp, blob=blob: tmp.write_bytes(blob))
        written[name] = out / name
    return written
