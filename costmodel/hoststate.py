"""Whether this host runs a multi-threaded timing at full speed right now.

On a virtual machine the host may keep one of the virtual cores a multi-threaded run
waits for busy with other work (other tenants).  At 2 threads on the 2-core machines here
MobileNetV2 takes 1.8 ms, 2.7 ms or 7.8 ms depending on the moment, each state lasting
from seconds to minutes, while the one-thread time of the same moments does not move and
no process of the guest is busy: the guest's load accounting (:class:`OtherLoad
<archpass.costmodel.adapt_measure.OtherLoad>`) cannot see it.  A probe can: a small network of
fork-join-bound layers, timed at the measurement's thread count, takes about 0.33 ms in
the fast state here and 0.6-0.7 ms in the slow ones.

Multi-threaded measurements read the probe around each window: a window whose probe was
more than :data:`FAST_RATIO` times the best probe reading is a *slow-state* window; it is
taken again after waiting for the fast state, and left out of the statistics when the
same network has fast-state windows, and a window's latency is a low percentile of its
runs (:func:`run_statistic`).  The latency a multi-threaded target predicts is the fast
state's, the hardware's own speed; what was seen is recorded.

The best reading is only a fast-state one if the host ran the probe's threads in
parallel at least once.  A host can stay in a slow state for a whole minute (here, at 2
threads, 87% of a minute's readings were slow and their median, 0.66 ms, was slower than
the probe on one thread, 0.62 ms; the fast state's 0.38 ms is 0.61 of it), and against a
slow best every window looks fast: the held-out models of ``benchmarks/adapt.py`` timed
with the adaptation's protocol in such a minute took up to 1.94x (MobileNetV2 1.34x,
ResNet-18 1.0x) what the same protocol measured in the minute before.  So the probe also
times itself on one thread once, and a measurement first waits
(:meth:`ParallelProbe.anchor`) for a reading that is clearly faster than that (at most
:data:`SERIAL_SHARE` of it); when none comes, what was seen says so and the
measurement's notes warn.
"""

from __future__ import annotations

import time

import numpy as np

#: a probe reading above this many times the best one marks the host's slow state
FAST_RATIO = 1.3
#: a multi-threaded probe reading above this share of the probe's one-thread time: the
#: threads did not run in parallel (the fast state at 2 threads here: 0.61)
SERIAL_SHARE = 0.85
#: pause before a probe reading, so that other sessions' spinning workers stop first
SETTLE_S = 0.03


def probe_model(channels: int = 48, size: int = 56, blocks: int = 8):
    """The probe: ``blocks`` x (1x1 conv, 3x3 depthwise conv, ReLU) at ``size`` x ``size``
    with ``channels`` channels (multiples of 8: no layout reorders), fixed weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits.append(numpy_helper.from_array((rng.standard_normal((channels, channels, 1, 1)) * 0.2).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array((rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype(np.float32), f"d{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Conv", [f"c{i}", f"d{i}"], [f"e{i}"], kernel_shape=[3, 3], pads=[1] * 4, group=channels))
        nodes.append(helper.make_node("Relu", [f"e{i}"], [f"r{i}"]))
        x = f"r{i}"
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "archpass_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


class ParallelProbe:
    """Probe readings at ``threads`` threads on ``provider`` (onnxruntime, all graph
    optimizations), with the best reading so far."""

    def __init__(self, threads: int, provider: str = "CPUExecutionProvider", runs: int = 3):
        import onnxruntime as ort

        from archpass.costmodel.backends.onnxruntime import session_options, timed_runs

        model = probe_model()
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=[provider])
        self.feeds = {"x": np.random.default_rng(1).standard_normal((1, 48, 56, 56)).astype(np.float32)}
        self.runs = runs
        self.best = float("inf")
        self.readings: list[float] = []
        for _ in range(3):
            self.session.run(None, self.feeds)
        # the probe's time on one thread (the best of three readings): the reference a
        # reading must clearly beat to show the threads running in parallel
        serial = ort.InferenceSession(model.SerializeToString(), session_options(1), providers=[provider])
        serial.run(None, self.feeds)
        self.serial_ms = min(min(timed_runs(serial, self.feeds, self.runs)) for _ in range(3))

    def read(self) -> float:
        """One reading (ms): after a pause and an untimed run, the fastest of ``runs`` runs."""
        from archpass.costmodel.backends.onnxruntime import timed_runs

        time.sleep(SETTLE_S)
        self.session.run(None, self.feeds)
        best = min(timed_runs(self.session, self.feeds, self.runs))
        self.best = min(self.best, best)
        self.readings.append(best)
        return best

    def parallel(self, ms: float) -> bool:
        """Whether a reading shows the threads running in parallel (clearly faster than one thread)."""
        return ms <= SERIAL_SHARE * self.serial_ms

    @property
    def parallel_seen(self) -> bool:
        """Whether any reading so far showed the threads running in parallel."""
        return self.parallel(self.best)

    def anchor(self, max_wait: float, poll: float = 0.2) -> float:
        """Read the probe until a reading shows the threads running in parallel (up to
        ``max_wait`` s), so that the best reading, which later readings are judged against,
        is the fast state's even when the host starts in a slow one.  Returns the seconds
        waited."""
        return self._read_until(self.parallel, max_wait, poll)[0]

    def fast(self, ms: float, best: float | None = None) -> bool:
        """Whether a reading is the fast state's (against ``best``, default the best so far)."""
        return not slow_state(ms, self.best if best is None else best)

    def wait_fast(self, max_wait: float, poll: float = 0.2) -> tuple[float, float]:
        """Read the probe until it shows the fast state (up to ``max_wait`` s).  Returns
        (seconds waited, last reading)."""
        return self._read_until(self.fast, max_wait, poll)

    def _read_until(self, ok, max_wait: float, poll: float) -> tuple[float, float]:
        """Read (at least once) until ``ok(reading)`` or ``max_wait`` s have passed:
        (seconds waited, last reading)."""
        t0 = time.perf_counter()
        ms = self.read()
        while not ok(ms) and time.perf_counter() - t0 < max_wait:
            time.sleep(poll)
            ms = self.read()
        return time.perf_counter() - t0, ms


def run_statistic(times, threads: int) -> float:
    """A window's latency from its runs: the median with one thread; with several the
    25th percentile (the state can change within a window, and a slow state only ever
    slows a run down; on an undisturbed host the two differ by a few percent)."""
    return float(np.median(times) if threads <= 1 else np.percentile(times, 25))


def slow_state(ms: float | None, best: float | None) -> bool:
    """Whether a probe reading shows the slow state against the best reading (False when
    either is missing: one thread, no probe)."""
    return bool(ms and best) and ms > FAST_RATIO * best


def fast_windows(probe_ms, best: float) -> list[int]:
    """Indices of the windows whose probe reading shows the fast state against ``best``
    (every window when none does, or when no window has a reading)."""
    idx = [i for i, p in enumerate(probe_ms) if not slow_state(p, best)]
    return idx or list(range(len(probe_ms)))


__all__ = ["FAST_RATIO", "SERIAL_SHARE", "ParallelProbe", "fast_windows", "probe_model", "run_statistic", "slow_state"]
