"""Choosing an adaptation's measurements (costmodel/adapt_plan.py): the models' dominant layers
then a spread, representatives, the networks' styles and coverage cells."""

from __future__ import annotations

import json

import numpy as np
import onnx
from builders import NetBuilder

from archpass.analysis import analyze
from archpass.costmodel import Kernel, load_target
from archpass.costmodel.adapt_plan import representatives, select_layers
from archpass.costmodel.kernels import decompose
from archpass.model import load_model

BASE = load_target("edgetpu")


def _tiny(path, width=16):
    net = NetBuilder((1, 3, 32, 32)).conv(width, 3, stride=2, act="relu6").ibn(width, expand=4).ibn(24, stride=2, expand=6)
    onnx.save(net.head(10).build(), path)
    return path


def test_selection_takes_the_models_dominant_layers_then_a_spread(tmp_path):
    model = _tiny(tmp_path / "tiny.onnx", width=24)
    specs = select_layers(BASE, BASE, 20, models=[model])
    assert len(specs) == 20 and len({json.dumps(s, sort_keys=True) for s in specs}) == 20
    model_shapes = {(k.cin, k.cout, k.kernel, k.in_hw) for k in decompose(analyze(load_model(model)), BASE.fusion)}
    picked = [(s["cin"], s["cout"], tuple(s["kernel"]), tuple(s["in_hw"])) for s in specs]
    assert any(p in model_shapes for p in picked[:3])
    assert {s["kind"] for s in specs} >= {"conv", "dwconv"}


def test_representatives_keep_fixed_rows_and_spread():
    x = np.r_[np.zeros((50, 2)), np.ones((50, 2)) * 10, [[5, 5]]]
    idx = representatives(x, 3, fixed=1)
    assert idx[0] == 0 and len(idx) == 3
    assert {tuple(x[i]) for i in idx[1:]} == {(10.0, 10.0), (5.0, 5.0)}  # the far cluster and the lone point


def test_candidates_rotate_styles_and_the_plan_covers_many_group_convs():
    """One candidate in six is a RegNet/ResNeXt-like grouped network and one a
    ShuffleNetV2-like one, and the coverage cells tell a conv's grouping apart, so the plan
    takes grouped convs with many groups."""
    from archpass.costmodel.adapt_plan import STYLES, group_bucket, select_networks

    assert STYLES.count("grouped") == 1 and STYLES.count("shuffle") == 1 and len(STYLES) == 6
    conv = dict(id="c", kind="conv", op="Conv", nodes=("c",), cin=64, cout=64, kernel=(3, 3))
    assert [group_bucket(Kernel(**conv, groups=g)) for g in (1, 2, 4, 8, 16, 64)] == [0, 1, 2, 2, 3, 4]
    assert group_bucket(Kernel(**{**conv, "kind": "dwconv"}, groups=64)) == 0
    nets = select_networks(load_target("cpu"), 12.0, 3, 5, 1, pool=10)
    labels = [n.label.split("-")[0] for n in nets]
    assert {"grouped", "template2", "network", "shuffle"} <= set(labels)
    # the ShuffleNet-like network brings data-movement kernels the others barely have
    assert sum(k.op in ("Transpose", "Split") for n in nets for k in n.kernels) >= 8
    many = [k for n in nets for k in n.kernels if k.kind == "conv" and 8 <= k.groups <= 80]
    assert len(many) >= 10


def test_coverage_cells_tell_alignment_and_resolution_apart_and_the_plan_chooses():
    """Two convs alike but for aligned channels, their output resolution, or a layout
    reorder of their output, fall in different coverage cells (ops keep the short cell); the plan picks at most
    PICKS_PER_BATCH networks per generated batch, so it chooses among more candidates than
    it takes, and covers more cells per planned second than the candidates in order."""
    from archpass.costmodel import adapt_plan as A

    conv = dict(id="c", kind="conv", op="Conv", nodes=("c",), cin=64, cout=64, kernel=(3, 3), in_hw=(28, 28),
                out_hw=(28, 28))
    a = A.coverage_cell(Kernel(**conv), 8)
    assert A.coverage_cell(Kernel(**{**conv, "cout": 60}), 8) != a  # unaligned
    assert A.coverage_cell(Kernel(**{**conv, "cout": 64}), 16) == a  # aligned on both
    assert A.coverage_cell(Kernel(**{**conv, "out_hw": (112, 112), "in_hw": (112, 112)}), 8)[-2] == 4
    assert A.coverage_cell(Kernel(**{**conv, "out_hw": (7, 7), "in_hw": (7, 7)}), 8)[-2] == 0
    assert [A.coverage_cell(Kernel(**{**conv, "out_hw": (h, h)}), 8)[-2] for h in (8, 14, 27, 28, 55, 56, 111)] == [
        1, 1, 1, 2, 2, 3, 3]
    # a conv whose output the blocked layout converts (it feeds an op) is another cell
    assert A.coverage_cell(Kernel(**{**conv, "blocked": True, "out_reorder": True}), 8) != A.coverage_cell(
        Kernel(**{**conv, "blocked": True}), 8)
    op = Kernel(id="o", kind="op", op="Add", nodes=("a",), cin=64, cout=64, out_elems=4096)
    assert len(A.coverage_cell(op, 8)) == 5
    cpu = load_target("cpu")
    nets = A.select_networks(cpu, 12.0, 3, 5, 1, pool=24)
    made = {int(n.label.split("-")[1]) - 700001 for n in nets}
    assert len(nets) >= 4 and made != set(range(len(nets)))  # not simply the first candidates
    assert max(made) >= len(nets)
