"""The user's evaluator: a command run on a candidate ONNX that prints metrics.

``--evaluator "python eval.py --data val/ {model}"`` is split like a shell would
(:func:`shlex.split`) but run without one; ``{model}`` in any argument is replaced by the
candidate's path.  The command's last non-empty line of stdout must be a JSON object; its
numeric entries are the metrics (``{"map": 0.412, "agreement": 0.97}``).  A run that
exits non-zero, outlives ``--evaluator-timeout`` (its whole process group is killed) or
prints no JSON object is an :class:`EvaluatorFailure`: the trial fails with the reason and
the tail of the command's stderr, and the study goes on.

``--min-metric NAME=VALUE`` (repeatable) constrains the metrics: :func:`parse_min_metric`
parses one, :func:`shortfalls` gives Optuna-style constraint values (<= 0 is met).

Bad usage is an :class:`EvaluatorError` (one line, exit code 2), raised before any trial
runs: a command that does not exist, no ``{model}`` placeholder, a malformed
``--min-metric``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from archpass.errors import ArchpassError

PLACEHOLDER = "{model}"
STDERR_TAIL_CHARS = 2000
STDERR_TAIL_LINES = 20


class EvaluatorError(ArchpassError):
    """The evaluator command or a metric constraint is unusable (checked before the search)."""


class EvaluatorFailure(Exception):
    """One evaluator run failed; the trial fails, the study goes on.

    ``reason`` is one sentence, ``stderr_tail`` the last lines the command wrote to
    stderr (kept for the report)."""

    def __init__(self, reason: str, stderr_tail: str = "", returncode: int | None = None, seconds: float = 0.0):
        super().__init__(reason)
        self.reason = reason
        self.stderr_tail = stderr_tail
        self.returncode = returncode
        self.seconds = seconds

    def to_json(self) -> dict:
        return {"ok": False, "reason": self.reason, "stderr_tail": self.stderr_tail,
                "returncode": self.returncode, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class EvaluatorResult:
    metrics: Mapping[str, float]
    seconds: float
    stderr_tail: str = ""

    def to_json(self) -> dict:
        return {"ok": True, "metrics": dict(self.metrics), "seconds": round(self.seconds, 3),
                "stderr_tail": self.stderr_tail}


@dataclass(frozen=True)
class MinMetric:
    """``--min-metric NAME=VALUE``: the evaluator's metric NAME must be >= VALUE."""

    name: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}>={self.value:g}"


def tail(text: str, lines: int = STDERR_TAIL_LINES, chars: int = STDERR_TAIL_CHARS) -> str:
    text = "\n".join(text.rstrip().splitlines()[-lines:])
    return text[-chars:]


def parse_min_metric(text: str) -> MinMetric:
    """``"map=0.40"`` -> MinMetric("map", 0.4); anything else is one EvaluatorError line."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep:
        raise EvaluatorError(f"--min-metric {text!r} has no '='", "write it as NAME=VALUE, e.g. --min-metric agreement=0.9")
    if not name:
        raise EvaluatorError(f"--min-metric {text!r} has no metric name", "write it as NAME=VALUE")
    try:
        number = float(value)
    except ValueError:
        raise EvaluatorError(f"--min-metric {text!r}: {value!r} is not a number",
                             "write it as NAME=VALUE with a numeric VALUE") from None
    if not math.isfinite(number):
        raise EvaluatorError(f"--min-metric {text!r} is not a finite number", "give a finite bound")
    return MinMetric(name, number)


def parse_min_metrics(texts: Sequence[str]) -> tuple[MinMetric, ...]:
    out = tuple(parse_min_metric(t) for t in texts)
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvaluatorError(f"--min-metric names {', '.join(dup)} more than once", "give each metric one bound")
    return out


def shortfalls(metrics: Mapping[str, float], minimums: Sequence[MinMetric]) -> tuple[float, ...]:
    """Optuna constraint values, one per bound: ``minimum - metric`` (<= 0 is met; a
    metric the evaluator did not report is infinitely short)."""
    return tuple(m.value - metrics[m.name] if m.name in metrics else math.inf for m in minimums)


def unmet(metrics: Mapping[str, float], minimums: Sequence[MinMetric]) -> list[str]:
    """Why ``metrics`` miss the bounds, one phrase per bound missed."""
    out = []
    for m in minimums:
        if m.name not in metrics:
            out.append(f"metric {m.name} not reported (reported: {', '.join(sorted(metrics)) or 'none'})")
        elif metrics[m.name] < m.value:
            out.append(f"{m.name} {metrics[m.name]:g} < {m.value:g}")
    return out


def parse_metrics(stdout: str) -> dict[str, float]:
    """The JSON object on the last non-empty line of ``stdout``, numeric entries only.
    Raises ValueError with the reason when there is none."""
    lines = [l for l in stdout.splitlines() if l.strip()]
    if not lines:
        raise ValueError("printed nothing on stdout (the last line must be a JSON object of metrics)")
    last = lines[-1].strip()
    try:
        doc = json.loads(last)
    except json.JSONDecodeError:
        raise ValueError(f"last line of stdout is not JSON: {last[:120]!r}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"last line of stdout is a JSON {type(doc).__name__}, not an object of metrics")
    metrics = {str(k): float(v) for k, v in doc.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if not metrics:
        raise ValueError(f"the JSON object on the last line has no finite numeric metric: {last[:120]!r}")
    return metrics


@dataclass(frozen=True)
class Evaluator:
    """A parsed ``--evaluator`` command.  Build it with :meth:`parse` (which checks the
    command up front), run it with :meth:`run`."""

    argv: tuple[str, ...]
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, command: str, timeout_s: float | None = None, *, check: bool = True) -> "Evaluator":
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise EvaluatorError(f"--evaluator cannot be split into arguments ({exc})",
                                 "check its quotes") from None
        if not argv:
            raise EvaluatorError("--evaluator is empty", 'give a command such as "python eval.py {model}"')
        if not any(PLACEHOLDER in a for a in argv):
            raise EvaluatorError(f"--evaluator {command!r} has no {PLACEHOLDER} placeholder",
                                 f"put {PLACEHOLDER} where the candidate ONNX path goes")
        if timeout_s is not None and not timeout_s > 0:
            raise EvaluatorError(f"--evaluator-timeout {timeout_s} is not positive", "give a number of seconds > 0")
        ev = cls(argv, timeout_s)
        if check:
            ev.check()
        return ev

    def check(self) -> None:
        """The program exists and is executable (raises EvaluatorError otherwise)."""
        prog = self.argv[0]
        if os.sep in prog or (os.altsep and os.altsep in prog):
            p = Path(prog).expanduser()
            if not p.is_file():
                raise EvaluatorError(f"evaluator command {prog} does not exist", "check the path in --evaluator")
            if not os.access(p, os.X_OK):
                raise EvaluatorError(f"evaluator command {prog} is not executable",
                                     f"chmod +x it or run it through its interpreter (python {prog} ...)")
        elif shutil.which(prog) is None:
            raise EvaluatorError(f"evaluator command {prog!r} not found on PATH",
                                 "install it or give its full path in --evaluator")

    def command_for(self, model: str | os.PathLike) -> list[str]:
        return [a.replace(PLACEHOLDER, os.fspath(model)) for a in self.argv]

    def run(self, model: str | os.PathLike) -> EvaluatorResult:
        """Run on ``model``; the metrics, or raise :class:`EvaluatorFailure`."""
        argv = self.command_for(model)
        start = time.monotonic()
        env = {**os.environ, **self.env} if self.env else None
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                    text=True, errors="replace", start_new_session=True, env=env)
        except OSError as exc:
            raise EvaluatorFailure(f"evaluator could not start ({exc.strerror or exc})") from None
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a descendant left the group and holds the pipes
                out, err = "", ""
            raise EvaluatorFailure(f"evaluator timed out after {self.timeout_s:g} s (process group killed)",
                                   tail(err), proc.returncode, time.monotonic() - start) from None
        except BaseException:
            _kill_group(proc)
            raise
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            raise EvaluatorFailure(f"evaluator {how}", tail(err), proc.returncode, seconds)
        try:
            metrics = parse_metrics(out)
        except ValueError as exc:
            raise EvaluatorFailure(f"evaluator output unusable: {exc}", tail(err), proc.returncode, seconds) from None
        return EvaluatorResult(metrics, seconds, tail(err))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---------------------------------------------------------------------------- in the search loop
EVALUATOR_ATTR = "evaluator"  # trial user attribute: EvaluatorResult/EvaluatorFailure.to_json()


def _feasible_values(study) -> list[float]:
    """First-objective values of the study's complete trials that met every constraint."""
    from optuna.trial import TrialState

    vals = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.values and all(c <= 0 for c in t.user_attrs.get("constraints", ())):
            vals.append(t.values[0])
    return sorted(vals)


@dataclass
class EvaluationStep:
    """The user's evaluator inside the search loop, for promising candidates only.

    ``promising(study, value)``: the cost model already scored the trial; it is worth the
    expensive command when its (first) objective value would rank among the ``top_k``
    best feasible trials of the whole study so far, whichever machine ran them.  So with
    a shared database the evaluations spread over the workers: each evaluates its own
    promising trials.  ``__call__`` materializes the candidate's ONNX (into ``workdir``,
    deleted afterwards), runs the evaluator, stores the outcome as the trial's
    ``evaluator`` attribute and returns the ``--min-metric`` constraint values; a failed
    run stores the failure (with its stderr tail) and raises :class:`EvaluatorFailure`,
    which fails the trial and lets the study go on."""

    evaluator: Evaluator
    model: Any  # archpass.model.Model the recipes apply to
    minimums: tuple[MinMetric, ...] = ()
    top_k: int = 5
    workdir: str | os.PathLike | None = None

    def promising(self, study, value: float) -> bool:
        best = _feasible_values(study)
        return len(best) < self.top_k or value < best[self.top_k - 1]

    def __call__(self, trial, recipe) -> tuple[float, ...]:
        import tempfile

        from archpass.model import save_model, source_form
        from archpass.passes.engine import apply_recipe

        with tempfile.TemporaryDirectory(prefix="archpass-candidate-", dir=self.workdir) as tmp:
            path = Path(tmp) / f"trial{trial.number}.onnx"
            # the source's interface and post-processing: the metric may need the detections
            save_model(source_form(apply_recipe(self.model, recipe).proto, self.model), path)
            try:
                result = self.evaluator.run(path)
            except EvaluatorFailure as exc:
                trial.set_user_attr(EVALUATOR_ATTR, exc.to_json())
                raise
        missed = unmet(result.metrics, self.minimums)
        trial.set_user_attr(EVALUATOR_ATTR, {**result.to_json(), **({"unmet": missed} if missed else {})})
        return shortfalls(result.metrics, self.minimums)
