"""costmodel/predictor.py: LightGBM loads without its optional integrations, and a
predictor's text model round-trips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from archpass.costmodel.features import LAYER_BASE, LAYER_FEATURES
from archpass.costmodel.predictor import Predictor, lightgbm

_PROBE = """
import sys
from archpass.costmodel.predictor import lightgbm
lgb = lightgbm()
print(sorted(m for m in ("sklearn", "pandas", "dask") if m in sys.modules))
print(sorted(m for m in ("sklearn", "pandas", "dask") if sys.modules.get(m, 0) is None))
"""


def test_lightgbm_loads_without_scikit_learn_or_pandas_and_leaves_them_importable():
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded, hidden = r.stdout.splitlines()[-2:]
    assert loaded == "[]"  # none of them was imported on the way
    assert hidden == "[]"  # and none is left blocked for the rest of the process


def test_a_process_that_loaded_pandas_first_keeps_it_in_lightgbm():
    probe = ("import sys, importlib.util\n"
             "if importlib.util.find_spec('pandas') is None: print('skip'); raise SystemExit\n"
             "import pandas\n"
             "from archpass.costmodel.predictor import lightgbm\n"
             "print(lightgbm().compat.PANDAS_INSTALLED)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] in ("True", "skip")


def test_a_fitted_predictor_round_trips_through_its_text_model():
    rng = np.random.default_rng(0)
    n = 64
    x = rng.uniform(1, 10, size=(n, len(LAYER_FEATURES)))
    base = np.column_stack([np.ones(n)] + [rng.uniform(1, 5, n) for _ in LAYER_BASE[1:]])
    y = base @ np.linspace(0.5, 1.5, len(LAYER_BASE)) * np.exp(0.2 * np.tanh(x[:, 0] - 5))
    p = Predictor.fit("conv", True, x, base, y, rounds=50)
    assert p.booster is not None and lightgbm().Booster is type(p.booster)
    q = Predictor.from_json(p.to_json("m.txt"), p.model_text())
    np.testing.assert_allclose(q.predict(x, base), p.predict(x, base), rtol=1e-9)
