"""Latency predictors: an analytic baseline times a learned correction.

For each kernel kind, latency ≈ baseline · exp(r(features)):

* the baseline is a non-negative linear fit on analytic terms (a constant, array steps,
  memory traffic for layers; a constant and element counts for other ops), so it scales
  to shapes outside the training range;
* r is a LightGBM regressor on the log ratio measured / baseline, over the analytic
  features (MACs, bytes, channels rounded up to the parallelism factor, utilization...)
  and, for runtime targets, the size of the network the kernel runs in.

Stored as JSON (the baseline, feature names, fit statistics) plus a LightGBM text model:
both version-stable text, never pickles.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

import numpy as np

from archpass.costmodel.features import CONTEXT_FEATURES, LAYER_BASE, LAYER_FEATURES, OP_BASE, OP_FEATURES, log_safe

#: optional integrations LightGBM imports when they are installed; archpass uses none of them
_LGB_OPTIONAL = ("sklearn", "pandas", "dask")


def lightgbm():
    """The ``lightgbm`` module, imported without its optional scikit-learn, pandas and dask
    integrations when they are not loaded yet.

    ``import lightgbm`` imports scikit-learn (and through it scipy.stats) and pandas when
    they are installed: 2.6 s against 0.7 s on a 2-core EPYC, paid by every process that
    loads a target (each search worker, each ``archpass`` command).  archpass trains and
    predicts with numpy arrays only.  The modules are hidden for the import alone; a
    process that imported any of them before gets LightGBM as usual.
    """
    mod = sys.modules.get("lightgbm")
    if mod is not None:
        return mod
    hidden = [m for m in _LGB_OPTIONAL if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # an import of it raises ImportError
    try:
        import lightgbm as lgb
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return lgb


LGB_PARAMS = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 4,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
    "num_threads": 1,
    "seed": 0,
    "deterministic": True,
}
MIN_POINTS_FOR_TREES = 30
FEATURE_SETS = (LAYER_FEATURES, OP_FEATURES, LAYER_FEATURES + CONTEXT_FEATURES, OP_FEATURES + CONTEXT_FEATURES)


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson via scipy if present, else projected)."""
    try:
        from scipy.optimize import nnls as _nnls

        return _nnls(a, b, maxiter=50 * a.shape[1])[0]
    except ImportError:  # pragma: no cover - scipy ships with lightgbm's deps
        x = np.maximum(np.linalg.lstsq(a, b, rcond=None)[0], 0)
        return x


@dataclass
class Predictor:
    kind: str
    features: tuple[str, ...]
    base_terms: tuple[str, ...]
    coef: tuple[float, ...]
    booster: object | None = None  # lightgbm.Booster
    n_train: int = 0
    model_file: str | None = None
    stats: dict = field(default_factory=dict)

    @property
    def layer(self) -> bool:
        return self.features[: len(LAYER_FEATURES)] == LAYER_FEATURES

    @property
    def context(self) -> bool:
        """Whether the predictor reads the network context (:data:`CONTEXT_FEATURES`)."""
        return self.features[-len(CONTEXT_FEATURES):] == CONTEXT_FEATURES

    def baseline(self, base: np.ndarray) -> np.ndarray:
        return np.maximum(base @ np.asarray(self.coef), 1e-9)

    def predict(self, x: np.ndarray, base: np.ndarray) -> np.ndarray:
        b = self.baseline(base)
        if self.booster is None or len(x) == 0:
            return b
        return b * np.exp(self.booster.predict(x, num_threads=1))

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, kind: str, layer: bool, x: np.ndarray, base: np.ndarray, y_ms: np.ndarray, rounds: int = 400,
            context: bool = False) -> "Predictor":
        features = (LAYER_FEATURES if layer else OP_FEATURES) + (CONTEXT_FEATURES if context else ())
        terms = LAYER_BASE if layer else OP_BASE
        y = np.asarray(y_ms, dtype=np.float64)
        # relative least squares: weight rows by 1/y so small kernels count as much as big ones
        w = 1.0 / np.maximum(y, 1e-9)
        coef = nnls(base * w[:, None], y * w)
        if not np.any(coef > 0):
            coef = np.zeros(base.shape[1])
            coef[0] = float(np.median(y))
        p = cls(kind, features, terms, tuple(float(c) for c in coef), None, len(y))
        if len(y) >= MIN_POINTS_FOR_TREES:
            lgb = lightgbm()

            r = log_safe(y) - log_safe(p.baseline(base))
            ds = lgb.Dataset(x, label=r, feature_name=list(features), free_raw_data=True,
                             params={"verbose": -1, "min_data_in_bin": 1})
            p.booster = lgb.train(LGB_PARAMS, ds, num_boost_round=rounds)
        return p

    # ------------------------------------------------------------------ storage
    def to_json(self, model_file: str | None = None) -> dict:
        """The JSON form; ``model_file`` names the LightGBM text file (see :func:`save_target`)."""
        return {
            "kind": self.kind,
            "features": list(self.features),
            "baseline_terms": list(self.base_terms),
            "baseline_coef": list(self.coef),
            "n_train": self.n_train,
            "model_file": model_file if model_file is not None else self.model_file,
            "stats": self.stats,
        }

    def model_text(self) -> str | None:
        return None if self.booster is None else self.booster.model_to_string()

    @classmethod
    def from_json(cls, d: dict, model_text: str | None) -> "Predictor":
        features = tuple(d["features"])
        terms = tuple(d["baseline_terms"])
        if features not in FEATURE_SETS:
            raise ValueError(f"predictor '{d.get('kind')}' has features {list(features)} this version does not compute")
        if terms not in (LAYER_BASE, OP_BASE) or len(d["baseline_coef"]) != len(terms):
            raise ValueError(f"predictor '{d.get('kind')}' has an unknown baseline {list(terms)}")
        booster = None
        if model_text is not None:
            booster = lightgbm().Booster(model_str=model_text)
            if booster.num_feature() != len(features):
                raise ValueError(f"predictor '{d['kind']}' model has {booster.num_feature()} features, expected {len(features)}")
        return cls(
            kind=d["kind"],
            features=features,
            base_terms=terms,
            coef=tuple(float(c) for c in d["baseline_coef"]),
            booster=booster,
            n_train=int(d.get("n_train", 0)),
            model_file=d.get("model_file"),
            stats=dict(d.get("stats", {})),
        )


@functools.lru_cache(maxsize=64)
def _booster(text: str):
    """A LightGBM booster from its model text, parsed once."""
    return lightgbm().Booster(model_str=text)


#: terms a :class:`Correction` reads (:func:`archpass.costmodel.features.correction_rows`)
LAYER_TERMS = ("one", "log_prior", "log_ideal", "log_mem")
OP_TERMS = ("one", "log_prior", "log_elems")
#: a correction never moves a prediction by more than this factor either way
MAX_LOG_CORRECTION = 3.0


@dataclass(frozen=True)
class Correction:
    """An adapted target's correction of its prior's prediction for one kernel kind:
    ``latency = reference · exp(coef · (z - center))`` with ``z`` the log terms of
    :data:`LAYER_TERMS` / :data:`OP_TERMS` (``one`` is not centred) and the reference the
    prior's prediction, or with ``baseline`` a new analytic baseline (the prior's
    prediction then enters through ``log_prior``).  ``method`` says how it was fitted."""

    kind: str
    method: str
    terms: tuple[str, ...]
    center: tuple[float, ...]
    coef: tuple[float, ...]
    n: int = 0
    #: when set, the reference is a new analytic baseline (coefficients over ``LAYER_BASE``
    #: or ``OP_BASE`` terms on the adapted target's hardware) instead of the prior's prediction
    baseline: tuple[float, ...] = ()
    #: a fixed time added to every kernel of this kind (ms): the per-kernel dispatch
    #: overhead a whole network pays that the profiled kernel times do not show
    add_ms: float = 0.0
    #: when set, the reference is the prior's predictors evaluated on the adapted target's
    #: hardware (its array, unroll and memory width) instead of on the prior's own
    transfer: bool = False
    #: LightGBM model text of residual trees (log factor over :func:`~archpass.costmodel.features.residual_rows`),
    #: for devices whose kernels differ from the prior's in structure, not only in scale
    trees: str = ""

    def reference(self, prior_ms: np.ndarray, base_terms: np.ndarray) -> np.ndarray:
        if not self.baseline:
            return np.asarray(prior_ms, dtype=np.float64)
        return np.maximum(np.asarray(base_terms, dtype=np.float64) @ np.asarray(self.baseline), 1e-9)

    def factor(self, z: np.ndarray) -> np.ndarray:
        if len(z) == 0:
            return np.ones(0)
        e = (np.asarray(z, dtype=np.float64) - np.asarray(self.center)) @ np.asarray(self.coef)
        return np.exp(np.clip(e, -MAX_LOG_CORRECTION, MAX_LOG_CORRECTION))

    def tree_factor(self, rows: np.ndarray) -> np.ndarray:
        """The residual trees' factor for :func:`~archpass.costmodel.features.residual_rows` (1 without trees)."""
        if not self.trees or len(rows) == 0:
            return np.ones(len(rows))
        booster = _booster(self.trees)
        # residual rows only grow at the end: trees of an older archpass read their own columns
        x = np.asarray(rows, dtype=np.float64)[:, : booster.num_feature()]
        e = booster.predict(x, num_threads=1)
        return np.exp(np.clip(e, -MAX_LOG_CORRECTION, MAX_LOG_CORRECTION))

    def to_json(self) -> dict:
        return {"kind": self.kind, "method": self.method, "terms": list(self.terms), "center": list(self.center),
                "coef": list(self.coef), "n": self.n, "baseline": list(self.baseline), "add_ms": self.add_ms,
                "transfer": self.transfer, "trees": self.trees}

    @classmethod
    def from_json(cls, d: dict) -> "Correction":
        terms = tuple(d["terms"])
        if terms not in (LAYER_TERMS, OP_TERMS) or not (len(d["coef"]) == len(d["center"]) == len(terms)):
            raise ValueError(f"correction '{d.get('kind')}' has unknown terms {list(terms)}")
        return cls(kind=str(d["kind"]), method=str(d.get("method", "?")), terms=terms,
                   center=tuple(float(c) for c in d["center"]), coef=tuple(float(c) for c in d["coef"]),
                   n=int(d.get("n", 0)), baseline=tuple(float(c) for c in d.get("baseline") or ()),
                   add_ms=float(d.get("add_ms", 0.0)), transfer=bool(d.get("transfer", False)),
                   trees=str(d.get("trees") or ""))
