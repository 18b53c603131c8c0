"""Mutation testing: how many small planted bugs the tests catch, per module (not in CI).

Runs mutmut 2 (``pip install -e '.[bench]'``) on a fresh clone of the committed tree
(HEAD), one module at a time, each against a targeted, fast test selection (the tests
that exercise it, without the real-architecture sweeps that take minutes), and writes
the kill ratio per module, with every surviving mutant's diff, to
benchmarks/results/mutation.json.  Where ``functions`` is given only those functions are
mutated (the fusion rules of kernels.py, the loading checks of model.py).

String and f-string mutations are off (they rewrite error-message text, which is checked by the
tests that matter and otherwise only measures wording).  Each run is bounded by
``--minutes`` (default 20 per module) and mutmut's own per-mutant timeout.  Run it alone
and nice'd::

    flock -s /tmp/archpass-quiet.lock nice -n 19 python benchmarks/mutation.py [MODULE ...]

The clone's tests import the clone's own (mutated) code: a ``sitecustomize`` on PYTHONPATH
maps the package names onto its folders as pyproject's package-dir does.
Survivors judged equivalent or unreachable are explained in ``EXPLAINED`` (by module,
line text and mutated text) and reported as such.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, write_results

FAST = "-x -q -p no:cacheprovider --import-mode=importlib"
# module -> (test selection, functions to mutate or None for the whole file)
MODULES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "archpass/blocks.py": ("tests/test_blocks.py tests/test_analysis.py", None),
    "passes/engine.py": ("tests/passes/test_engine.py -k 'not every_architecture and not random_valid'", None),
    "costmodel/kernels.py": ("tests/costmodel/test_kernels.py", ("FusionRules", "decompose", "_act_nodes", "_act_of",
                                                                  "_is_const", "_shape", "_slice_partitions")),
    "archpass/model.py": ("tests/test_model.py", ("parse_input_shapes", "_read_proto", "_external_tensors",
                                                  "_check_external_data", "_check", "_pin_inputs", "_custom_ops",
                                                  "_unshaped", "load_model")),
    "passes/fuse_ibn.py": ("tests/passes/test_fuse_ibn.py -k 'not real'", None),
    "passes/dw_to_dense.py": ("tests/passes/test_dw_to_dense.py -k 'not real'", None),
    "passes/resize.py": ("tests/passes/test_resize.py tests/passes/test_channels.py -k 'not real'", None),
    "passes/structedit.py": ("tests/passes/test_channels.py tests/passes/test_width_multiplier.py -k 'not real'", None),
    "passes/width_multiplier.py": ("tests/passes/test_width_multiplier.py -k 'not real'", None),
    "passes/resolution.py": ("tests/passes/test_resolution.py -k 'not real'", None),
    "passes/channels.py": ("tests/passes/test_channels.py -k 'not real'", None),
    "passes/base.py": ("tests/passes/test_base.py tests/passes/test_engine.py -k 'not every_architecture and not random'",
                       None),
}

# (module, stripped source line, stripped mutated line) -> why the survivor is not a test gap
EXPLAINED: dict[tuple[str, str, str], str] = {}


def _shim(clone: Path) -> Path:
    """A folder with a ``sitecustomize`` that imports the archpass packages from the clone, mapped
    as pyproject's package-dir maps them (``archpass.passes`` = ``passes/`` ...), ahead of any
    installed archpass (an editable install elsewhere would otherwise win)."""
    shim = clone.parent / "shim"
    shim.mkdir()
    mapping = {"archpass": "archpass", "archpass.passes": "passes", "archpass.costmodel": "costmodel",
               "archpass.costmodel.backends": "costmodel/backends", "archpass.search": "search", "archpass.cli": "cli"}
    mapping = {k: str(clone / v) for k, v in mapping.items()}
    (shim / "sitecustomize.py").write_text(f"""import importlib.util
import sys

MAPPING = {mapping!r}


class _CloneFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in MAPPING:
            return importlib.util.spec_from_file_location(name, MAPPING[name] + "/__init__.py",
                                                          submodule_search_locations=[MAPPING[name]])
        return None


sys.meta_path[:] = [_CloneFinder] + [f for f in sys.meta_path if "archpass" not in getattr(f, "__module__", "")]
""")
    return shim


def _patch_for(path: Path, functions: tuple[str, ...]) -> str:
    """A unified diff that marks the lines of ``functions`` (top-level defs/classes) as added."""
    src = path.read_text()
    lines = src.splitlines()
    out = [f"--- a/{path.name}", f"+++ b/{path}"]
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in functions:
            start, end = node.lineno, node.end_lineno
            out.append(f"@@ -0,0 +{start},{end - start + 1} @@")
            out += ["+" + lines[i - 1] for i in range(start, end + 1)]
    return "\n".join(out) + "\n"


def _statuses(cache: Path) -> list[dict]:
    con = sqlite3.connect(cache)
    rows = con.execute(
        "SELECT m.id, m.status, m.'index', l.line, l.line_number FROM Mutant m JOIN Line l ON m.line = l.id "
        "ORDER BY m.id").fetchall()
    con.close()
    return [{"id": i, "status": s, "index": k, "line": line, "line_number": n + 1} for i, s, k, line, n in rows]


def run_module(module: str, clone: Path, env: dict, minutes: float) -> dict:
    tests, functions = MODULES[module]
    cache = clone / ".mutmut-cache"
    if cache.exists():
        cache.unlink()
    args = [sys.executable, "-m", "mutmut", "run", "--paths-to-mutate", module, "--tests-dir", "tests",
            "--runner", f"{sys.executable} -m pytest {FAST} {tests}", "--disable-mutation-types", "string,fstring",
            "--simple-output", "--no-progress"]
    if functions:
        patch = clone.parent / (module.replace("/", "_") + ".patch")
        patch.write_text(_patch_for(clone / module, functions).replace(f"+++ b/{clone / module}", f"+++ b/{module}"))
        args += ["--use-patch-file", str(patch)]
    t0 = time.time()
    try:
        proc = subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=minutes * 60)
        finished = True
        tail = proc.stdout[-400:]
    except subprocess.TimeoutExpired:
        finished = False
        tail = "timed out"
    subprocess.run(["git", "checkout", "--", module], cwd=clone, check=True)  # a killed run may leave a mutant
    rows = _statuses(cache) if cache.exists() else []
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    survivors = []
    for r in rows:
        if r["status"] not in ("bad_survived", "bad_timeout", "ok_suspicious"):
            continue
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", str(r["id"])], cwd=clone, env=env,
                              capture_output=True, text=True).stdout
        minus = [l[1:].strip() for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
        plus = [l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
        key = (module, minus[0] if minus else "", plus[0] if plus else "")
        survivors.append({"id": r["id"], "status": r["status"], "line_number": r["line_number"], "index": r["index"],
                          "line": r["line"], "from": key[1], "to": key[2], "explained": EXPLAINED.get(key)})
    tested = sum(v for k, v in counts.items() if k != "untested" and k != "skipped")
    killed = counts.get("ok_killed", 0) + counts.get("bad_timeout", 0)  # a hang is caught, if slowly
    explained = sum(1 for s in survivors if s["explained"] and s["status"] == "bad_survived")
    return {
        "tests": tests, "functions": list(functions) if functions else "all",
        "mutants": len(rows), "tested": tested, "counts": counts,
        "kill_ratio": round(killed / tested, 3) if tested else None,
        "kill_ratio_excluding_explained": round(killed / (tested - explained), 3) if tested > explained else None,
        "finished": finished, "seconds": round(time.time() - t0, 1), "mutmut_tail": tail, "survivors": survivors,
    }


def _mutant_source(module: str, src: str, survivor: dict) -> str | None:
    """``src`` with ``survivor``'s mutation applied (found by its line's text), or None if that line is gone."""
    from types import SimpleNamespace

    from mutmut import Context, RelativeMutationID, mutate, mutations_by_type

    lines = src.splitlines()
    at = survivor["line_number"] - 1
    if not (0 <= at < len(lines) and lines[at] == survivor["line"]):
        same = [i for i, line in enumerate(lines) if line == survivor["line"]]
        if len(same) != 1:
            return None
        at = same[0]
    config = SimpleNamespace(mutation_types_to_apply=set(mutations_by_type) - {"string", "fstring"},
                             covered_lines_by_filename=None)
    mid = RelativeMutationID(line=survivor["line"], index=survivor["index"], line_number=at)
    new, n = mutate(Context(source=src, mutation_id=mid, filename=module, config=config))
    return new if n else None


def recheck_module(module: str, r: dict, clone: Path, env: dict) -> dict:
    """Run the current tests against each survivor of an earlier run: killed (any test failure or
    collection error), survived, or gone (its line was removed or rewritten)."""
    tests, _ = MODULES[module]
    path = clone / module
    src = path.read_text()
    for s in r["survivors"]:
        new = _mutant_source(module, src, s)
        if new is None:
            s["recheck"] = "gone"
            continue
        path.write_text(new)
        try:
            rc = subprocess.run(f"{sys.executable} -m pytest {FAST} {tests}", shell=True, cwd=clone, env=env,
                                capture_output=True, timeout=600).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            path.write_text(src)
        s["recheck"] = "survived" if rc == 0 else "killed"
    left = [s for s in r["survivors"] if s.get("recheck") == "survived"]
    r["after_recheck"] = {
        "killed_by_new_tests": sum(s.get("recheck") == "killed" for s in r["survivors"]),
        "code_removed": sum(s.get("recheck") == "gone" for s in r["survivors"]),
        "still_surviving": len(left),
        "explained": sum(bool(s["explained"]) for s in left),
        "unexplained": [f"{s['line_number']}: {s['from']} -> {s['to']}" for s in left if not s["explained"]],
    }
    tested = r["tested"] - r["after_recheck"]["code_removed"]
    r["kill_ratio_after_recheck"] = round((tested - len(left)) / tested, 3) if tested else None
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=list(MODULES))
    ap.add_argument("--minutes", type=float, default=20.0, help="bound on each module's run")
    ap.add_argument("--jobs", type=int, default=1, help="modules run at once, each in its own clone")
    ap.add_argument("--recheck", action="store_true",
                    help="rerun the current tests against the survivors recorded in mutation.json (implies --merge)")
    ap.add_argument("--merge", action="store_true", help="keep other modules' results already in mutation.json")
    opts = ap.parse_args()
    unknown = [m for m in opts.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    old = ROOT / "benchmarks" / "results" / "mutation.json"

    def earlier() -> dict:
        return json.loads(old.read_text()).get("modules", {}) if old.exists() else {}

    previous = earlier() if opts.recheck else {}
    results: dict = {}

    def one(module: str) -> tuple[str, dict]:
        with tempfile.TemporaryDirectory(prefix="archpass-mutation-") as d:
            clone = Path(d) / "repo"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
            env = {**os.environ, "PYTHONPATH": str(_shim(clone)), "PYTHONDONTWRITEBYTECODE": "1"}
            if opts.recheck:
                if module not in previous:
                    raise SystemExit(f"no earlier results for {module} to recheck")
                r = {**recheck_module(module, previous[module], clone, env), "recheck_commit": commit}
            else:
                r = {**run_module(module, clone, env, opts.minutes), "commit": commit}
        print(f"{module:28s} {r['kill_ratio']} killed of {r['tested']} tested ({r['counts']}) "
              f"{'' if r['finished'] else 'NOT FINISHED '}{r['seconds']} s", flush=True)
        return module, r

    # each module in its own clone; --jobs of them at once (a nice'd run gets little CPU on a busy machine)
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        for module, r in pool.map(one, opts.modules):
            results[module] = r
    if opts.merge or opts.recheck:  # read again now: another run may have written meanwhile
        results = {**earlier(), **results}
    total_tested = sum(r["tested"] for r in results.values())
    total_killed = sum(r["counts"].get("ok_killed", 0) + r["counts"].get("bad_timeout", 0) for r in results.values())
    out = write_results("mutation", {"tool": "mutmut 2.5.1", "string_mutations": False,
                                     "note": "kill_ratio: mutmut's own count (it counts a pytest collection error, "
                                             "exit 2, as survived); kill_ratio_after_recheck: survivors rerun "
                                             "against the tests at 'recheck_commit' (any failing exit counts as killed), "
                                             "survivors whose code was removed left out",
                                     "overall_kill_ratio": round(total_killed / total_tested, 3) if total_tested else None,
                                     "modules": results})
    print(f"overall {total_killed}/{total_tested}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
