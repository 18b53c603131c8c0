"""Calibration data sources: random, .npy, .npz, image folders; each bad input is one CalibrationError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from archpass.errors import CalibrationError
from archpass.model import model_from_proto
from archpass.search.calib import load_calibration
from builders import NetBuilder


@pytest.fixture(scope="module")
def model():
    return model_from_proto(NetBuilder((1, 3, 8, 8), seed=1).conv(8, 3).head(4).build())


def test_random_is_seeded_and_marked(model):
    a = load_calibration(None, model, samples=5, seed=3)
    b = load_calibration(None, model, samples=5, seed=3)
    c = load_calibration(None, model, samples=5, seed=4)
    assert a.random and a.arrays["input"].shape == (5, 3, 8, 8) and a.arrays["input"].dtype == np.float32
    assert np.array_equal(a.arrays["input"], b.arrays["input"])
    assert not np.array_equal(a.arrays["input"], c.arrays["input"])
    assert [len(x["input"]) for x in a.batches(2)] == [2, 2, 1]


def test_npy_and_npz(model, tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8))
    np.save(tmp_path / "x.npy", x)
    d = load_calibration(tmp_path / "x.npy", model, samples=4)
    assert not d.random and d.arrays["input"].shape == (4, 3, 8, 8) and d.arrays["input"].dtype == np.float32
    np.testing.assert_allclose(d.arrays["input"], x[:4].astype(np.float32))
    np.savez(tmp_path / "x.npz", input=x, labels=np.arange(6))
    assert load_calibration(tmp_path / "x.npz", model).samples == 6
    np.save(tmp_path / "one.npy", x[0])  # one sample without its batch axis
    assert load_calibration(tmp_path / "one.npy", model).samples == 1


def _png(path, rgb):
    from PIL import Image

    Image.fromarray(np.full((4, 4, 3), rgb, np.uint8)).save(path)


def test_image_folder_preprocessing(model, tmp_path):
    _png(tmp_path / "a.png", (255, 0, 51))
    _png(tmp_path / "b.png", (0, 255, 0))
    (tmp_path / "notes.txt").write_text("ignored")
    d = load_calibration(tmp_path, model)
    assert d.samples == 2 and d.arrays["input"].shape == (2, 3, 8, 8)
    np.testing.assert_allclose(d.arrays["input"][0, :, 3, 3], [1.0, 0.0, 0.2], atol=1e-6)
    d = load_calibration(tmp_path, model, mean=[0.5, 0.5, 0.5], std=0.5, channel_order="bgr")
    np.testing.assert_allclose(d.arrays["input"][0, :, 0, 0], [(0.2 - 0.5) / 0.5, -1.0, 1.0], atol=1e-6)
    nhwc = model_from_proto(_nhwc_model())
    for layout in ("nhwc", "auto"):  # auto: only the last axis has 3 channels
        d = load_calibration(tmp_path, nhwc, layout=layout)
        assert d.arrays["input"].shape == (2, 8, 8, 3)
        np.testing.assert_allclose(d.arrays["input"][1, 0, 0], [0.0, 1.0, 0.0], atol=1e-6)
    assert load_calibration(tmp_path, model, layout="auto").arrays["input"].shape == (2, 3, 8, 8)
    with pytest.raises(CalibrationError, match="8 channels in nchw"):
        load_calibration(tmp_path, nhwc, layout="nchw")


def test_auto_layout_reads_where_the_channels_are():
    from archpass.search.calib import image_layout

    assert image_layout((1, 3, 224, 224)) == "nchw" and image_layout((1, 1, 28, 28)) == "nchw"
    assert image_layout((1, 224, 224, 3)) == "nhwc" and image_layout((1, 28, 28, 1)) == "nhwc"
    assert image_layout((1, 3, 3, 3)) == "nchw"  # both could be: the ONNX convention


def _nhwc_model():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Transpose", ["input"], ["t"], perm=[0, 3, 1, 2]),
                           helper.make_node("Relu", ["t"], ["output"])], "nhwc",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 3])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 8, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("case", ["wrong_shape", "missing_name", "unreadable_image", "empty_folder", "other_model",
                                  "missing_file", "bad_format", "nan"])
def test_bad_data_is_one_line(model, tmp_path, case):
    rng = np.random.default_rng(0)
    if case == "wrong_shape":
        np.save(tmp_path / "d.npy", rng.standard_normal((4, 3, 9, 8)))
        src = tmp_path / "d.npy"
    elif case == "missing_name":
        np.savez(tmp_path / "d.npz", images=rng.standard_normal((4, 3, 8, 8)))
        src = tmp_path / "d.npz"
    elif case == "unreadable_image":
        _png(tmp_path / "ok.png", (1, 2, 3))
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        src = tmp_path
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        src = tmp_path / "empty"
    elif case == "other_model":  # data made for a 224x224 one-channel model
        np.save(tmp_path / "d.npy", rng.standard_normal((2, 1, 224, 224)))
        src = tmp_path / "d.npy"
    elif case == "missing_file":
        src = tmp_path / "nope.npz"
    elif case == "bad_format":
        (tmp_path / "d.csv").write_text("1,2,3")
        src = tmp_path / "d.csv"
    else:
        x = rng.standard_normal((2, 3, 8, 8))
        x[0, 0, 0, 0] = np.nan
        np.save(tmp_path / "d.npy", x)
        src = tmp_path / "d.npy"
    with pytest.raises(CalibrationError) as exc:
        load_calibration(src, model)
    line = exc.value.line()
    assert "\n" not in line and "; " in line
