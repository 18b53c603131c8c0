"""Where a target's predictors were fitted, and which kernels of a model lie far outside.

The predictors' baseline extrapolates sensibly, their tree correction does not; either
way an estimate for a kernel ten times larger than anything measured is a guess.  At
calibration, :func:`kernel_range` records, per predictor, the range of a few size
quantities over the kernels it was fitted on (``stats["range"]`` of the predictor in
``target.json``); :func:`extrapolation_notes` names the kernels of a model that lie more
than :data:`FAR` times outside it.  A target without recorded ranges gets no note.
"""

from __future__ import annotations

from archpass.costmodel.kernels import LAYER_KINDS, Kernel

#: How far outside the calibrated range (as a factor) a kernel must lie to be noted.
FAR = 4.0


def quantities(k: Kernel) -> dict[str, int]:
    """The size quantities compared with the calibrated range."""
    if k.kind in LAYER_KINDS:
        return {"cin": k.cin, "cout": k.cout, "out_pixels": k.out_hw[0] * k.out_hw[1], "macs": k.macs,
                "weights": k.weight_elems}
    return {"in_elems": k.in_elems, "out_elems": k.out_elems}


def kernel_range(kernels: list[Kernel]) -> dict[str, list[int]]:
    """[min, max] of each quantity over ``kernels`` (what a predictor was fitted on)."""
    out: dict[str, list[int]] = {}
    for k in kernels:
        for q, v in quantities(k).items():
            lo_hi = out.setdefault(q, [v, v])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], v), max(lo_hi[1], v)
    return out


def _outside(v: float, lo: float, hi: float) -> float:
    """How many times ``v`` lies outside [lo, hi] (1 inside)."""
    if v > hi:
        return v / max(hi, 1)
    if 0 < v < lo:
        return lo / v
    return 1.0


def extrapolation_notes(kernels: list[Kernel], used: list[str | None], target) -> list[str]:
    """One note naming the kernels far outside the range the target's predictors were
    fitted on (``used[i]`` is the predictor that scored ``kernels[i]``), or none."""
    worst: dict[str, tuple[float, Kernel, str, int, list[int]]] = {}
    for k, p in zip(kernels, used):
        pred = target.predictors.get(p) if p else None
        rng = (pred.stats or {}).get("range") if pred is not None else None
        if not rng:
            continue
        for q, v in quantities(k).items():
            if q in rng:
                f = _outside(v, *rng[q])
                if f > FAR and f > worst.get(k.id, (0,))[0]:
                    worst[k.id] = (f, k, q, v, rng[q])
    if not worst:
        return []
    f, k, q, v, (lo, hi) = max(worst.values(), key=lambda w: w[0])
    where = f"layer '{k.layers[0]}'" if k.layers else f"kernel {k.id} ({k.op})"
    return [f"{len(worst)} kernel(s) lie far outside the range target {target.name} was calibrated on "
            f"(e.g. {where}: {q} {v:,}, calibrated {lo:,}..{hi:,}): the estimate is extrapolated there"]
