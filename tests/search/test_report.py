"""search/report.py: report data from a stored study, the files written, and the HTML
page rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from archpass.costmodel import estimate
from archpass.passes.engine import apply_recipe_shapes
from archpass.recipe import Recipe
from archpass.search.report import (
    FILES,
    TrialRow,
    _best_row,
    block_latencies,
    pareto_front,
    render_html,
    report_from_study,
    write_report,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chromium  # noqa: E402
from report_study import FAILED_EVALUATOR_TRIAL, STDERR, make_study  # noqa: E402

CHROMIUM = chromium.binary()


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    study, storage, structure, target = make_study(folder, trials=40)
    data = report_from_study(study, storage=str(storage))
    out = folder / "out"
    written = write_report(data, out)
    return study, data, out, written, structure, target


def test_pareto_front():
    pts = [(0.9, 5.0), (0.95, 6.0), (0.8, 4.0), (0.9, 7.0), (0.99, 9.0), (0.85, 6.5)]
    assert pareto_front(pts, maximize_x=True) == [4, 1, 0, 2]
    assert pareto_front([(1, 3), (2, 2), (3, 1), (3, 3)], maximize_x=False) == [0, 1, 2]


def test_never_slower_best_is_the_original():
    rows = [TrialRow(0, "COMPLETE", (1.2,), feasible=True), TrialRow(1, "COMPLETE", (0.5,), feasible=False)]
    assert _best_row(rows, [1.0]) is None
    assert _best_row(rows + [TrialRow(2, "COMPLETE", (0.9,), feasible=True)], [1.0]).number == 2


def test_block_latencies_add_up(stored):
    _, data, _, _, structure, target = stored
    recipe = Recipe.from_json(data.recipe)
    before, after = estimate(structure, target, best_order=False), estimate(
        apply_recipe_shapes(structure, recipe), target, best_order=False)
    rows = block_latencies(structure, before, after)
    assert sum(r.before_ms for r in rows) == pytest.approx(before.latency_ms)
    assert sum(r.after_ms for r in rows) == pytest.approx(after.latency_ms)
    assert [r.label for r in rows][:2] == ["stem", "block0"] and rows == data.blocks


def test_report_data_from_a_stored_study(stored):
    study, data, *_ = stored
    trials = study.get_trials(deepcopy=False)
    assert len(data.trials) == len(trials) == 40
    feasible = [t for t in data.trials if t.feasible]
    best = min(feasible, key=lambda t: t.values[0])
    assert data.best_trial == best.number and data.recipe == trials[best.number].user_attrs["recipe"]
    assert data.best.latency_ms == pytest.approx(best.values[0])
    assert data.best.latency_ms < data.baseline.latency_ms
    failed = data.trials[FAILED_EVALUATOR_TRIAL]
    assert not failed.feasible and failed.stderr_tail == STDERR and "exited with code 1" in failed.reason
    invalid = [t for t in data.trials if t.estimate is None]
    assert invalid and all("group0" in t.reason for t in invalid)
    assert data.score_kind == "proxy" and data.best_score == trials[best.number].user_attrs["guard"]["score"]
    h = data.headline()
    assert h["trials"] == {"COMPLETE": 40} and h["feasible_trials"] == len(feasible)
    assert h["latency_change_pct"] == pytest.approx(100 * (data.best.latency_ms / data.baseline.latency_ms - 1), abs=0.01)


def test_written_files(stored):
    _, data, out, written, *_ = stored
    assert sorted(written) == sorted(FILES) and all((out / f).is_file() for f in FILES)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    doc = json.loads((out / "report.json").read_text())
    assert doc["best_trial"] == data.best_trial and len(doc["trials"]) == 40 and doc["headline"]["trials"]["COMPLETE"] == 40
    md = (out / "report.md").read_text()
    assert f"{data.baseline.latency_ms:.3f} ms" in md and f"{data.best.latency_ms:.3f} ms" in md
    for png in ("trials.png", "blocks.png", "history.png"):
        assert f"({png})" in md
    assert STDERR.splitlines()[-1] in md
    from PIL import Image

    for png in ("trials.png", "blocks.png", "history.png"):
        img = Image.open(out / png)
        assert img.format == "PNG" and img.size[0] >= 600 and np.asarray(img.convert("L")).std() > 5


def test_html_is_self_contained(stored):
    _, data, out, *_ = stored
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://|<script|<link|@import|url\(", page)
    evil = data.__class__(**{**data.__dict__, "notes": ("<script>alert(1)</script>",)})
    assert "<script>alert(1)" not in render_html(evil, {}) and "&lt;script&gt;" in render_html(evil, {})


IMG_PROBE = ('<script>window.addEventListener("load",()=>{const im=[...document.images];'
             'const d=document.createElement("p");d.id="imgprobe";'
             'd.textContent="images "+im.length+" loaded "+im.filter(i=>i.complete&&i.naturalWidth>0).length;'
             'document.body.appendChild(d);});</script>')


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)")
def test_html_report_in_headless_chromium(stored, tmp_path):
    _, data, out, *_ = stored
    shot = chromium.screenshot(out / "report.html", tmp_path / "shot.png")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and plots, not a blank page

    # every image loaded: the same page plus a probe script that counts decoded images
    probe = tmp_path / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", IMG_PROBE + "</body>"))
    dom = chromium.dump_dom(probe)
    assert re.search(r'id="imgprobe">images 3 loaded 3<', dom), dom[-500:]
    text = re.sub(r"<[^>]+>", " ", dom)
    for figure in (f"{data.baseline.latency_ms:.3f} → {data.best.latency_ms:.3f} ms",
                   f"{data.headline()['latency_change_pct']:+.1f}%", f"trial {data.best_trial}"):
        assert figure in text


def test_guard_results_on_finalists(stored):
    """The search guards finalists only (study attribute archpass.finalists): their scores
    reach the rows, a failed finalist is infeasible with the reason, the best passed."""
    study, data, *_ = stored
    from archpass.search.report import FINALISTS_ATTR

    ranked = sorted((t for t in data.trials if t.feasible), key=lambda t: t.values[0])
    first, second = ranked[0], ranked[1]
    checked = [{"number": first.number, "kind": "proxy", "score": 0.95, "threshold": 0.99, "ok": False},
               {"number": second.number, "kind": "proxy", "score": 0.995, "threshold": 0.99, "ok": True}]
    study.set_user_attr(FINALISTS_ATTR, checked)
    try:
        again = report_from_study(study)
    finally:
        study.set_user_attr(FINALISTS_ATTR, [])
    row = again.trials[first.number]
    assert not row.feasible and "proxy 0.95 < 0.99" in row.reason and row.score == 0.95
    assert again.best_trial == second.number and again.score_kind == "proxy" and again.best_score == 0.995
