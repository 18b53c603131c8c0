"""Generated calibration contexts: whole networks and short chains."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from archpass.analysis import analyze
from archpass.costmodel.calibrate import Dataset, corrected_points
from archpass.costmodel.chains import (BUILDERS, ChainBuilder, build_grouped, build_network, build_shuffle, build_template,
                                       regnet_stages)
from archpass.costmodel.kernels import FusionRules, decompose


@pytest.mark.parametrize("seed", [0, 1, 5, 8, 21])
def test_networks_are_valid_whole_cnns(seed):
    model = build_network(seed)
    onnx.checker.check_model(model, full_check=True)
    structure = analyze(model)
    stem = structure.layers[0]
    assert stem.cin == 3 and stem.stride[0] == 2  # a stem reads the image
    assert len(structure.layers) >= 5
    kernels = decompose(structure, FusionRules(residual_add=True))
    covered = {n for k in kernels for n in k.nodes}
    assert {l.id for l in structure.layers} <= covered


def test_networks_are_a_pure_function_of_the_seed():
    a, b = build_network(3), build_network(3)
    assert a.SerializeToString() == b.SerializeToString()
    assert build_network(4).SerializeToString() != a.SerializeToString()


def test_network_size_is_capped():
    for seed in range(12):
        builder = ChainBuilder(seed)
        builder.build_network(max_macs=3e8)
        # the cap is checked before every block: at most one block past it
        assert builder.macs < 3e8 + 4e8, seed


def test_aligned_templates_keep_widths_at_multiples_of_8():
    seen = 0
    for seed in range(20):
        builder = ChainBuilder(seed)
        model = builder.build_template()
        if not builder.aligned:
            continue
        seen += 1
        for layer in analyze(model).layers[1:]:  # the stem reads 3 channels
            if layer.op == "Conv" and layer.groups == 1:
                assert layer.cout % 8 == 0, (seed, layer.id, layer.cout)
    assert seen >= 3


def test_network_points_keep_stem_and_last_kernel_chain_points_do_not(tmp_path):
    ds = Dataset(tmp_path / "d.jsonl")
    spec = dict(kind="conv", op="Conv", cin=8, cout=8, kernel=[1, 1], stride=[1, 1], groups=1, in_hw=[4, 4], out_hw=[4, 4])
    pts = [{"spec": spec, "ms": 0.1 * (i + 1), "nodes": 1} for i in range(5)]
    ds.add({"key": "net", "payload": {"seed": 0, "style": "network"}, "plain_ms": 1.5, "points": pts})
    ds.add({"key": "old", "payload": {"seed": 0}, "plain_ms": 1.5, "points": pts})
    got = corrected_points(ds, ["net", "old"], 0.0)
    assert [ms for k, _, ms in got if k == "net"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert [ms for k, _, ms in got if k == "old"] == pytest.approx([0.2, 0.3, 0.4])


def test_every_style_is_registered():
    assert set(BUILDERS) == {"network", "template", "template2", "chain", "grouped", "shuffle"}
    onnx.checker.check_model(BUILDERS["chain"](2), full_check=True)


def test_templates_follow_architecture_families():
    kinds = set()
    for seed in range(12):
        builder = ChainBuilder(seed)
        model = builder.build_template()
        assert model.SerializeToString() == build_template(seed).SerializeToString()
        onnx.checker.check_model(model, full_check=True)
        s = analyze(model)
        assert s.layers[0].cin == 3 and s.layers[-1].op == "Gemm"  # stem to classifier
        blocks = {b.kind for b in s.blocks}
        kinds |= blocks
        assert blocks & {"ibn", "fused_ibn", "depthwise", "residual"}, seed
        assert len(s.stages) >= 3 or builder.macs > 3e9, seed  # ResNet-like plans stop at 3 GMACs
    assert {"ibn", "residual"} <= kinds


def test_templates_put_squeeze_excitation_in_expansion_1_blocks_too():
    """MobileNetV3-Small's and EfficientNet's first block (depthwise conv, squeeze-excitation,
    1x1 projection, no expansion) is in the ``template2`` style: some seed puts a
    squeeze-excitation gate right after the network's first depthwise conv; the
    ``template`` style never does."""
    from archpass.costmodel.chains import build_template2

    def se_first(model) -> bool:
        nodes = list(model.graph.node)
        convs = [n for n in nodes if n.op_type == "Conv"]
        if len(convs) < 3 or dict((a.name, a.i) for a in convs[1].attribute).get("group", 1) == 1:
            return False  # not an inverted-residual template starting with an expansion-1 block
        return any(n.op_type == "GlobalAveragePool" for n in nodes[nodes.index(convs[1]) + 1:nodes.index(convs[2])])

    assert any(se_first(build_template2(seed)) for seed in range(40))  # seed 17 is the first
    assert not any(se_first(build_template(seed)) for seed in range(20))
    onnx.checker.check_model(build_template2(3), full_check=True)


def test_template_seeds_still_build_what_the_cpu_dataset_measured():
    """Calibration datasets key generated networks by style and seed and rebuild them
    (``calibrate.refresh_specs``, ``benchmarks/predictor_accuracy.py``): the shipped ``cpu``
    target's template records of seeds 17, 24 and 31 (which a change of ``template``'s own
    draws once rebuilt as other networks) still decompose into every kernel they measured."""
    import json
    from pathlib import Path

    from archpass.costmodel import load_target

    cpu = load_target("cpu")
    seen = set()
    for line in (Path(cpu.path) / "dataset.jsonl").read_text().splitlines():
        rec = json.loads(line)
        payload = rec.get("payload") or {}
        if payload.get("style") != "template" or payload.get("seed") not in (17, 24, 31):
            continue
        ks = {k.id: k for k in decompose(analyze(build_template(payload["seed"])), cpu.fusion)}
        for p in rec["points"]:
            k, want = ks[p["id"]], p["spec"]
            assert (k.kind, k.cin, k.cout, list(k.in_hw)) == (want["kind"], want["cin"], want["cout"], list(want["in_hw"]))
        seen.add(payload["seed"])
    assert seen == {17, 24, 31}


def test_shuffle_networks_are_shufflenet_v2_like():
    """A stem and max-pool, three stages of a downsampling unit and split units (each a
    Split, a branch of 1x1, depthwise 3x3 and 1x1, a Concat and a channel shuffle of
    Reshape, Transpose, Reshape), a wide 1x1 conv and a classifier; even widths at any
    multiplier; it runs in onnxruntime and is a pure function of the seed."""
    import collections

    import onnxruntime as ort

    widths, means = set(), 0
    for seed in range(8):
        model = build_shuffle(seed)
        assert model.SerializeToString() == BUILDERS["shuffle"](seed).SerializeToString()
        onnx.checker.check_model(model, full_check=True)
        ops = collections.Counter(n.op_type for n in model.graph.node)
        assert ops["MaxPool"] == 1 and ops["Transpose"] == ops["Concat"] == ops["Split"] + 3
        assert ops["Reshape"] == 2 * ops["Transpose"]
        s = analyze(model)
        assert s.layers[0].cin == 3 and s.layers[-1].op == "Gemm"
        dw = [l for l in s.layers if l.op == "Conv" and l.groups == l.cin > 1]
        assert len(dw) == ops["Split"] + 6  # one per split unit, two per downsampling unit
        assert all(l.cout % 2 == 0 for l in s.layers if l.op == "Conv")
        widths |= {l.cout for l in dw}
        means += ops["ReduceMean"]
        if seed < 2:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(seed).random(sess.get_inputs()[0].shape, dtype=np.float32)
            assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()
    assert len(widths) >= 8 and 0 < means < 8


def test_refresh_specs_rederives_kernel_specs_from_the_seed(tmp_path):
    """A dataset measured before a spec field existed gets it from the regenerated network."""
    from archpass.costmodel.calibrate import refresh_specs

    rules = FusionRules(residual_add=True)
    kernels = decompose(analyze(build_network(4)), rules)
    old = [{"id": k.id, "ms": 0.1, "nodes": 1,
            "spec": {f: v for f, v in k.spec().items() if f not in ("in_from_op", "out_to_op")}} for k in kernels]
    ds = Dataset(tmp_path / "d.jsonl")
    ds.add({"key": "n4", "payload": {"seed": 4, "style": "network"}, "plain_ms": 1.0, "points": old})
    ds.add({"key": "z", "payload": {"spec": {}}, "points": [{"spec": {"kind": "conv"}, "ms": 1.0}]})  # a ZigZag layer
    assert refresh_specs(ds, rules) == 1
    again = Dataset(tmp_path / "d.jsonl")
    assert [p["spec"] for p in again.records["n4"]["points"]] == [k.spec() for k in kernels]
    assert again.records["z"]["points"][0]["spec"] == {"kind": "conv"}
    assert refresh_specs(again, rules) == 0  # nothing left to refresh


def test_regnet_widths_follow_the_quantized_linear_rule():
    """RegNetY-400MF's parameters (w0 48, wa 27.89, wm 2.09, depth 16) give torchvision's
    stage widths and depths."""
    stages = regnet_stages(48, 27.89, 2.09, 16)
    assert [s[0] for s in stages] == [48, 104, 208, 440]
    assert [len(s) for s in stages] == [1, 3, 6, 6]
    assert max(s[0] for s in regnet_stages(96, 48.0, 2.9, 21, cap=512)) == 512


def _grouped_convs(model):
    return [l for l in analyze(model).layers if l.op == "Conv" and 1 < l.groups < l.cin]


def test_grouped_networks_are_regnet_and_resnext_like():
    """Four strided stages of grouped bottlenecks (3x3, many groups later on, group width
    8-64 where the width allows), with SE in some, ResNeXt-like 2-4x wider outputs in others,
    from an image to a classifier; a pure function of the seed."""
    many, se, wide = 0, 0, 0
    for seed in range(10):
        builder = ChainBuilder(seed)
        model = builder.build_grouped()
        assert model.SerializeToString() == BUILDERS["grouped"](seed).SerializeToString()
        onnx.checker.check_model(model, full_check=True)
        s = analyze(model)
        assert s.layers[0].cin == 3 and s.layers[0].stride[0] == 2 and s.layers[-1].op == "Gemm"
        grouped = _grouped_convs(model)
        assert all(l.kernel == (3, 3) for l in grouped), seed
        strided = [l for l in grouped if l.stride[0] == 2]
        assert 3 <= len(strided) <= 4, seed  # every stage starts strided (four stages; the cap may merge two)
        assert all(24 <= l.cin <= 1032 for l in grouped), seed
        assert all(8 <= l.cin // l.groups <= 64 for l in grouped if l.cin >= 64), seed
        assert max(l.groups for l in grouped) <= 80, seed
        many += sum(8 <= l.groups for l in grouped)
        ops = {n.op_type for n in model.graph.node}
        se += {"GlobalAveragePool", "Sigmoid"} <= ops and sum(n.op_type == "GlobalAveragePool" for n in model.graph.node) > 1
        widths = {l.cout for l in s.layers if l.op == "Conv" and l.kernel == (1, 1)}
        wide += any(2 * l.cout in widths or 4 * l.cout in widths for l in strided)
        small = _grouped_convs(ChainBuilder(seed).build_grouped(max_macs=1e7))
        assert len(small) == len(strided) < len(grouped), seed  # past the cap, a stage keeps its first block only
    assert many >= 60 and se >= 2 and wide >= 2
    assert build_grouped(3).SerializeToString() != build_grouped(4).SerializeToString()


def test_templates_fuse_early_stages_as_ibn_fusion_does():
    """Fused early stages take the stage's kernel size (3 or 5, as fusing a 5x5 depthwise
    block gives) and keep the stage's squeeze-excitation: a dense k x k conv with a
    squeeze-excitation after it, as `fuse_ibn` makes of EfficientNet's blocks."""
    sizes, se_after_dense = set(), 0
    for seed in range(30):  # a fused 5x5 first at seed 10, a squeeze-excitation after one at seed 9
        model = build_template(seed)
        nodes = list(model.graph.node)
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        shapes = {t.name: t for t in model.graph.initializer}
        for n in nodes:
            if n.op_type != "Conv":
                continue
            w = shapes[n.input[1]]
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if group != 1 or w.dims[1] <= 3 or w.dims[2] == 1:
                continue  # dense k x k convs past the stem
            sizes.add(w.dims[2])
            out, seen = n.output[0], 0
            while seen < 3:  # through the activation's nodes
                nxt = consumers.get(out, [])
                if any(c.op_type == "GlobalAveragePool" and consumers[c.output[0]][0].op_type == "Conv" for c in nxt):
                    se_after_dense += 1
                    break
                if len(nxt) != 1 and not any(c.op_type == "Mul" for c in nxt):
                    break
                out, seen = nxt[-1].output[0], seen + 1
    assert {3, 5} <= sizes
    assert se_after_dense >= 1
