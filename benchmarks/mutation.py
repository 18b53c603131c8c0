"""Mutation testing: how many small planted bugs the tests catch, per module (not in CI).

Uses mutmut 2's mutation operators (``pip install -e '.[bench]'``) on a fresh clone of the
committed tree (HEAD): each mutant in turn is written into the module, the module's
targeted, fast test selection runs (the tests that exercise it, without the
real-architecture sweeps that take minutes), and the file is restored.  A mutant is killed
when pytest exits non-zero (failures, errors, a collection error) or hangs past its
timeout.  (mutmut's own runner is not used: on this shared machine it deadlocked in its
worker queue, and it counts a collection error as a survivor.)  Writes the kill ratio
per module, with every survivor's line, to benchmarks/results/mutation.json.  Where
``functions`` is given only those functions are mutated (the fusion rules of kernels.py,
the loading checks of model.py); ``--most N`` tests an evenly spread sample of N mutants.

String and f-string mutations are off (they rewrite error-message text, which is checked
by the tests that matter and otherwise only measures wording).  Each module's run is
bounded by ``--minutes``; each mutant by 10x the baseline test time (at least 2 min).
Run it nice'd under the shared lock::

    flock -s /tmp/archpass-quiet.lock nice -n 19 python benchmarks/mutation.py [MODULE ...] --jobs 4
    ... python benchmarks/mutation.py MODULE@0:250 MODULE@250:502 --merge   # a long module in parts
    ... python benchmarks/mutation.py MODULE ... --recheck --wide   # survivors against today's tests

``MODULE@START:END`` runs that part of the module's mutant list; parts merge into one result
(with ``--merge``, which keeps the other modules' results).  ``--at COMMIT`` runs another
commit.  ``--recheck`` reruns the survivors not yet killed against the module's selection,
``--wide`` against every fast test of the passes and the core (``WIDE``), ``--existing`` at
the commit the mutants were run on (what a wider selection of the tests of the time kills).

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
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, write_results

FAST = "-x -q -p no:cacheprovider --import-mode=importlib"
# module -> (test selection, functions to mutate or None for the whole file)
DESCRIBE = "tests/passes/test_engine.py::test_every_pass_describes_itself"  # every pass has a summary and an exactness
PASSES_FAST = "tests/passes -k 'not real and not every_architecture and not random'"  # structedit/graphutil: every pass
MODULES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "archpass/blocks.py": ("tests/test_blocks.py tests/test_analysis.py", None),
    "passes/engine.py": ("tests/passes/test_engine.py -k 'not every_architecture and not random_valid'", None),
    "costmodel/kernels.py": ("tests/costmodel/test_kernels.py", ("FusionRules", "decompose", "_act_nodes", "_act_of",
                                                                  "_is_const", "_shape", "_slice_partitions")),
    "archpass/model.py": ("tests/test_model.py", ("parse_input_shapes", "_read_proto", "_external_tensors",
                                                  "_check_external_data", "_check", "_pin_inputs", "_custom_ops",
                                                  "_unshaped", "load_model")),
    "passes/fuse_ibn.py": (f"tests/passes/test_fuse_ibn.py {DESCRIBE} -k 'not real'", None),
    "passes/dw_to_dense.py": (f"tests/passes/test_dw_to_dense.py {DESCRIBE} -k 'not real'", None),
    "passes/resize.py": ("tests/passes/test_resize.py tests/passes/test_channels.py -k 'not real'", None),
    "passes/structedit.py": (PASSES_FAST, None),
    "passes/graphutil.py": (PASSES_FAST, None),
    "passes/width_multiplier.py": (f"tests/passes/test_width_multiplier.py {DESCRIBE} -k 'not real'", None),
    "passes/resolution.py": (f"tests/passes/test_resolution.py {DESCRIBE} -k 'not real'", None),
    "passes/channels.py": (f"tests/passes/test_channels.py {DESCRIBE} -k 'not real'", None),
    "passes/base.py": ("tests/passes/test_base.py tests/passes/test_engine.py -k 'not every_architecture and not random'",
                       None),
}
# the second look at a survivor of a module's own selection (``--recheck --wide``): every fast test of
# the passes and the core, so a survivor is a test gap of the suite, not of the targeted selection
WIDE = f"{PASSES_FAST} tests/test_analysis.py tests/test_blocks.py tests/test_model.py tests/costmodel/test_kernels.py"
# resize.py has the most survivors to recheck: the tests of the passes that resize, not the whole WIDE
WIDE_FOR = {"passes/resize.py": "tests/passes/test_resize.py tests/passes/test_channels.py "
                                "tests/passes/test_width_multiplier.py -k 'not real'"}

# (module, stripped source line, stripped mutated line) -> why the survivor is not a test gap
EXPLAINED: dict[tuple[str, str, str], str] = {
    ('archpass/blocks.py',
     'break',
     'continue'):
        'equivalent: the SE walk meets the gate Mul only when the walked tensor already feeds it (it stops there first) or when the pool feeds the Mul directly, where both versions find no SE layers',
    ('archpass/blocks.py',
     'found = None',
     'found = ""'):
        "equivalent: found is only tested for truth; None and '' are both false",
    ('archpass/blocks.py',
     'ADD_RULES: tuple[Callable[[onnx.NodeProto, BlockGraph], Match | None], ...] = (match_residual,)',
     'ADD_RULES: tuple[Callable[[onnx.NodeProto, BlockGraph], Match & None], ...] = (match_residual,)'):
        'equivalent: a module-level annotation, never evaluated (from __future__ import annotations)',
    ('passes/engine.py',
     '"exact": self.result.exact if exact is None else exact,',
     '"exact": self.result.exact if exact is not None else exact,'):
        "equivalent: record() is only called with the graph path's exactness, which apply_recipe asserts equals the shape path's",
    ('passes/engine.py',
     'near = difflib.get_close_matches(rw.pass_name, list(reg), n=1)',
     'near = difflib.get_close_matches(rw.pass_name, list(reg), n=2)'):
        'equivalent: only the first suggestion is shown',
    ('passes/engine.py',
     'onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,',
     'onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=False,'):
        'equivalent: the checker reads a temporary external-data copy in one file or many alike',
    ('passes/engine.py',
     'out = gs.export_onnx(graph, do_type_check=True)',
     'out = gs.export_onnx(graph, do_type_check=False)'):
        "equivalent for the graphs passes emit: graphsurgeon's type check only raises on untyped tensors, and check_model(full_check=True) runs right after on every output",
    ('passes/engine.py',
     'seen: dict[tuple[str, str | None], int] = {}',
     'seen: dict[tuple[str, str & None], int] = {}'):
        'equivalent: the annotation of a local variable is never evaluated',
    ('passes/engine.py',
     'onnx.checker.check_model(proto, full_check=True)',
     'onnx.checker.check_model(proto, full_check=False)'):
        "equivalent: full_check adds strict shape inference with type checks, which _reinfer has just run on the "
        "same graph (model.infer_shapes: check_type, strict_mode, data_prop); only metadata and doc strings change after",
    ('costmodel/kernels.py',
     'if not layer.act_output or layer.act_output == layer.output:',
     'if not layer.act_output and layer.act_output == layer.output:'):
        'equivalent: without an activation (act_output empty or the output itself) the walk that follows finds no node either',
    ('costmodel/kernels.py',
     'end_prod is not None and order[other_prod.name] < order[end_prod.name]',
     'end_prod is not None and order[other_prod.name] <= order[end_prod.name]'):
        'equivalent: two different nodes never share a position; the same producer on both sides (Add(x, x)) '
        'has two uses of x, so the Add is not fused anyway',
    ('costmodel/kernels.py',
     'if n.op != "Slice" or n.name in seen or not n.inputs:',
     'if n.op != "Slice" and n.name in seen or not n.inputs:'):
        'equivalent: partitions are looked up by Slice names only; a non-Slice node finds the same sibling Slices '
        'its Slice siblings would, and an entry under its own name is never read',
    ('archpass/model.py',
     'if path is not None:',
     'if path is  None:'):
        'equivalent below 2 GB (the branch is only taken for models above it, which no test can load); both check the same graph, by path or as a weightless copy',
    ('archpass/model.py',
     'if not (d.HasField("dim_value") and d.dim_value > 0):',
     'if  (d.HasField("dim_value") and d.dim_value > 0):'):
        'equivalent: output dims are cleared only to be re-inferred right after; clearing static ones too gives the same inferred shapes',
    ('archpass/model.py',
     'if not (d.HasField("dim_value") and d.dim_value > 0):',
     'if not (d.HasField("dim_value") and d.dim_value > 1):'):
        'equivalent: output dims are cleared only to be re-inferred right after; clearing static ones too gives the same inferred shapes',
    ('archpass/model.py',
     'known[vi.name] = True',
     'known[vi.name] = None'):
        "equivalent: 'known' is only used for membership",
    ('archpass/model.py',
     'known[init.name] = True',
     'known[init.name] = None'):
        "equivalent: 'known' is only used for membership",
    ('archpass/model.py',
     'if not (d.HasField("dim_value") and d.dim_value > 0):',
     'if not (d.HasField("dim_value") and d.dim_value >= 0):'):
        'equivalent: output dims are cleared only to be re-inferred right after; keeping a declared 0 gives the same '
        'inferred shapes (tests/test_model.py::test_stale_output_dims_are_inferred_again)',
    ('archpass/model.py',
     'if not (d.HasField("dim_value") and d.dim_value > 0):',
     'if not (d.HasField("dim_value") or d.dim_value > 0):'):
        'equivalent: output dims are cleared only to be re-inferred right after; keeping a declared 0 gives the same '
        'inferred shapes (tests/test_model.py::test_stale_output_dims_are_inferred_again)',
    ('archpass/model.py',
     'known[vi.name] = True',
     'known[vi.name] = False'):
        "equivalent: 'known' is only used for membership",
    ('archpass/model.py',
     'known[init.name] = True',
     'known[init.name] = False'):
        "equivalent: 'known' is only used for membership",
    ('archpass/blocks.py',
     'LAYER_RULES: tuple[Callable[[Layer, BlockGraph], Match | None], ...] = (match_ibn, match_fused_ibn, match_depthwise)',
     'LAYER_RULES: tuple[Callable[[Layer, BlockGraph], Match & None], ...] = (match_ibn, match_fused_ibn, match_depthwise)'):
        'equivalent: a module-level annotation, never evaluated (from __future__ import annotations)',
    ('archpass/blocks.py',
     'cur_hw = None',
     'cur_hw = ""'):
        'equivalent: cur_hw is only compared with a block resolution (a tuple), which differs from None and "" alike',
    ('archpass/blocks.py',
     'stage_blocks: list[str] = []',
     'stage_blocks: list[str] = None'):
        'equivalent: the first block always starts a stage (its resolution differs from the initial cur_hw), which '
        'resets stage_blocks before it is appended to; before that it is only tested for truth',
    ('passes/fuse_ibn.py',
     'if m.node == d.id and m.role == "depthwise" and gid == exp_group:',
     'if m.node == d.id or m.role == "depthwise" and gid == exp_group:'):
        "equivalent: the depthwise conv of an ibn site has one member, its 'depthwise' member in the expand's "
        "output group, and no other node has a 'depthwise' member in that group (its only depthwise conv is d)",
    ('passes/dw_to_dense.py',
     'return l.groups > 1 and l.groups == l.cin == l.cout',
     'return l.groups >= 1 and l.groups == l.cin == l.cout'):
        'equivalent: a layer reading a tensor of the group has cin >= the group\'s channels >= 2 (a depthwise site '
        'has groups > 1), so groups == cin == cout == 1 never holds there',
    ('passes/dw_to_dense.py',
     'return l.groups > 1 and l.groups == l.cin == l.cout',
     'return l.groups > 1 and l.groups == l.cin != l.cout'):
        "equivalent: a multiplier conv's output has another channel count than its input, so it never carries "
        "the group: tying it adds no tensor of the group",
    ('passes/dw_to_dense.py',
     'ChannelGroup(gnew, s.group(g).channels, tuple(moved), True).with_fixes(fixes_new),)',
     'ChannelGroup(gnew, s.group(g).channels, tuple(moved), False).with_fixes(fixes_new),)'):
        'equivalent: with_fixes sets adjustable from the fixes',
    ('passes/resize.py',
     'if w.shape[1] == 1 and group == w.shape[0] and out_map is not None:  # depthwise: in = out',
     'if w.shape[1] == 1 or group == w.shape[0] and out_map is not None:  # depthwise: in = out'):
        "equivalent: a grouped conv with one input channel per group is depthwise (then out_map is set: its "
        "group changed) or has a channel multiplier, whose input and output groups are fixed and never resized",
    ('passes/base.py',
     'current: int | None = None',
     'current: int & None = None'):
        'equivalent: an annotation, never evaluated (from __future__ import annotations)',
    ('passes/base.py',
     'current: float | None = None',
     'current: float & None = None'):
        'equivalent: an annotation, never evaluated (from __future__ import annotations)',
    ('passes/base.py',
     'Domain = Union[IntDomain, FloatDomain, CategoricalDomain]',
     'Domain = None'):
        'equivalent: the alias is only used in annotations, never evaluated (from __future__ import annotations)',
    ('passes/structedit.py',
     'changed = False',
     'changed = None'):
        'equivalent: changed is only tested for truth; False and None are both false',
    ('passes/structedit.py',
     'if o and o not in tensors:',
     'if o or o not in tensors:'):
        'equivalent for the chains passes ask for (the activation ops between two convs, after loading): none of '
        'their nodes has an empty (omitted optional) output name, and a tensor met again is skipped by its users '
        'already being seen',
    ('passes/dw_to_dense.py',
     'split = None',
     'split = ""'):
        "equivalent: split is only tested for truth; None and '' are both false",
    ('passes/resize.py',
     'if len(t.segments) > 1:',
     'if len(t.segments) >= 1:'):
        'equivalent: _recompute_offsets gives the true offsets of any group; also running it for the groups of single-segment tensors only costs time',
    ('passes/resize.py',
     'outputs = tuple((n, tensors[n].shape if n in tensors else s) for n, s in structure.outputs)',
     'outputs = tuple((n, tensors[n].shape if n not in tensors else s) for n, s in structure.outputs)'):
        "equivalent: a graph output fixes its channel group, so resizing never changes an output's shape (old = new)",
    ('passes/resize.py',
     'if t is None or not t.segments:',
     'if t is None and not t.segments:'):
        "equivalent: every node's tensors are analysed (t is never None), and a tensor without segments yields no offsets, so the member keeps its offset on both paths",
    ('passes/resize.py',
     'if m.role == "split":',
     'if m.role != "split":'):
        "equivalent: members of a (node, role) come in the order of the group's occurrences in the tensor, so the k-th new offset and the new offset at the member's old offset are the same for split and concat members",
    ('passes/resize.py',
     'out.append(replace(m, offset=offsets[k] if k < len(offsets) else m.offset))',
     'out.append(replace(m, offset=offsets[k] if k <= len(offsets) else m.offset))'):
        'equivalent: a (node, role) has one member per occurrence of the group in its tensor, so k < len(offsets) whenever offsets is not empty, and k == len(offsets) never happens',
    ('passes/resize.py',
     'name, k = f"{base}_{k}", k + 1',
     'name, k = f"{base}_{k}", k - 1'):
        'equivalent: the loop stops at the first name not taken either way (k - 1 tries base_1, base_0, base_-1, ...); only the spelling of a per-node copy of a shared constant differs',
    ('passes/resize.py',
     'return 1, 0',
     'return 2, 0'):
        "equivalent: a Conv's input-channel axis from _axes is never read (edit_conv remaps axis 1 itself; _in_axis is used for Gemm/MatMul only)",
    ('passes/resize.py',
     'self.set_const(gn, i, _remap(self._need(gn, i, sn), t.channel_axis - first, out_map, 0.0))',
     'self.set_const(gn, i, _remap(self._need(gn, i, sn), t.channel_axis - first, out_map, 1.0))'):
        "equivalent in function: the padded channel's LayerNorm output is read only by the zero input weights the next layer gets for it (the mean and variance come from the inputs, not the scale)",
    ('passes/resize.py',
     'elif op == "Resize" and out_map is not None and len(gn.inputs) > 3 and gn.inputs[3].name:',
     'elif op == "Resize" or out_map is not None and len(gn.inputs) > 3 and gn.inputs[3].name:'):
        "equivalent: a Resize that is edited has out_map set (its output carries its input's groups) and one without sizes gets const None; an other op reaching here with a fourth input is a Concat, whose inputs are not constants (const None)",
    ('passes/resize.py',
     'if sn.op == "Gemm" and len(gn.inputs) > 2 and gn.inputs[2].name:',
     'if sn.op == "Gemm" or len(gn.inputs) > 2 and gn.inputs[2].name:'):
        'equivalent: a Gemm without C gets const None (skipped), and a MatMul has two inputs',
    ('passes/resize.py',
     'if target.size == len(t.shape) and int(target.reshape(-1)[j]) == t.shape[j]:',
     'if target.size == len(t.shape) and int(target.reshape(-2)[j]) == t.shape[j]:'):
        'equivalent: numpy takes any negative size as the one unknown dimension (reshape(-2) == reshape(-1))',
    ('passes/resize.py',
     'start_old = int(np.clip(int(starts.reshape(-1)[k]), -c_old, c_old)) % c_old',
     'start_old = int(np.clip(int(starts.reshape(-2)[k]), -c_old, c_old)) % c_old'):
        'equivalent: numpy takes any negative size as the one unknown dimension (reshape(-2) == reshape(-1))',
    ('passes/resize.py',
     'ends.reshape(-1)[k] = new_end',
     'ends.reshape(-2)[k] = new_end'):
        'equivalent: numpy takes any negative size as the one unknown dimension (reshape(-2) == reshape(-1))',
    ('passes/resize.py',
     'have[gid] = m if prev is None else np.where(m >= 0, prev[np.maximum(m, 0)], -1)',
     'have[gid] = m if prev is None else np.where(m >= 0, prev[np.maximum(m, 1)], -1)'):
        'equivalent: np.maximum only changes the entries where m < 0, which np.where replaces by -1',
    ('passes/resize.py',
     'if t.channel_axis is not None and t.segments and not changed.isdisjoint(t.segments):',
     'if t.channel_axis is not None or t.segments and not changed.isdisjoint(t.segments):'):
        'equivalent: analysis gives every tensor with a channel axis its segments, so the mutant only recomputes unchanged tensors to the same shape and the offsets of more groups to the same offsets',
    ('passes/resize.py',
     'seen[(m.node, m.role)] = k + 1',
     'seen[(m.node, m.role)] = k - 1'):
        'equivalent: the members of one (node, role) differ only by their offset; k - 1 hands them offsets[0], offsets[-1], offsets[-2], ... (a permutation of the same offsets), so the group holds the same members',
}


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


def _config():
    from types import SimpleNamespace

    from mutmut import mutations_by_type

    return SimpleNamespace(mutation_types_to_apply=set(mutations_by_type) - {"string", "fstring"},
                           covered_lines_by_filename=None)


def _function_lines(src: str, functions: tuple[str, ...]) -> set[int]:
    """0-based line numbers of the top-level defs/classes named ``functions``."""
    out: set[int] = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in functions:
            out.update(range(node.lineno - 1, node.end_lineno))
    return out


def list_mutants(module: str, src: str, functions: tuple[str, ...] | None) -> list:
    from mutmut import Context, list_mutations

    ids = list_mutations(Context(source=src, filename=module, config=_config()))
    if functions:
        keep = _function_lines(src, functions)
        ids = [m for m in ids if m.line_number in keep]
    return ids


def _apply(module: str, src: str, mid) -> str | None:
    from mutmut import Context, mutate

    new, n = mutate(Context(source=src, mutation_id=mid, filename=module, config=_config()))
    return new if n else None


def _run_tests(clone: Path, env: dict, tests: str, timeout: float) -> str:
    """'passed', 'failed' (any non-zero exit: failures, errors, collection errors) or 'timeout'."""
    proc = subprocess.Popen(f"exec {sys.executable} -m pytest {FAST} {tests}", shell=True, cwd=clone, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang: end pytest and anything it started (its own session)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    return "passed" if rc == 0 else "failed"


def _changed_line(src: str, new: str) -> tuple[str, str]:
    for x, y in zip(src.splitlines(), new.splitlines()):
        if x != y:
            return x.strip(), y.strip()
    return "", ""


def run_module(module: str, clone: Path, env: dict, minutes: float, most: int | None,
               part: tuple[int, int] | None = None) -> dict:
    """Apply each mutant (mutmut's operators) in turn, run the module's tests, restore the file.
    ``part`` = (start, end): only the mutants at those positions of the module's list."""
    tests, functions = MODULES[module]
    path = clone / module
    src = path.read_text()
    mutants = list_mutants(module, src, functions)
    total = len(mutants)
    part = (max(0, part[0]), min(total, part[1])) if part else (0, total)
    mutants = mutants[part[0]:part[1]]
    if most and len(mutants) > most:  # an evenly spread, deterministic sample
        mutants = [mutants[i * len(mutants) // most] for i in range(most)]
    t0 = time.time()
    base = _run_tests(clone, env, tests, 1800)
    baseline_s = time.time() - t0
    if base != "passed":
        return {"tests": tests, "error": f"baseline tests {base}"}
    counts = {"killed": 0, "timeout": 0, "survived": 0}
    survivors = []
    finished = True
    covered = 0
    for mid in mutants:
        if time.time() - t0 > minutes * 60:
            finished = False
            break
        covered += 1
        new = _apply(module, src, mid)
        if new is None:
            continue
        path.write_text(new)
        try:
            outcome = _run_tests(clone, env, tests, max(30.0, 10 * baseline_s))
        finally:
            path.write_text(src)
        status = {"failed": "killed", "timeout": "timeout", "passed": "survived"}[outcome]
        counts[status] += 1
        if status == "survived":
            before, after = _changed_line(src, new)
            survivors.append({"line_number": mid.line_number + 1, "index": mid.index, "line": mid.line,
                              "from": before, "to": after, "explained": EXPLAINED.get((module, before, after))})
    tested = sum(counts.values())
    killed = counts["killed"] + counts["timeout"]  # a hang is caught, if slowly
    explained = sum(1 for s in survivors if s["explained"])
    return {
        "tests": tests, "functions": list(functions) if functions else "all",
        "mutants": total, "parts": [[part[0], part[1] if finished or most else part[0] + covered]], "sampled": covered, "tested": tested, "counts": counts,
        "kill_ratio": round(killed / tested, 3) if tested else None,
        "kill_ratio_excluding_explained": round(killed / (tested - explained), 3) if tested > explained else None,
        "finished": finished, "seconds": round(time.time() - t0, 1), "baseline_s": round(baseline_s, 1),
        "survivors": survivors,
    }


def merge_parts(module: str, old: dict | None, new: dict) -> dict:
    """One module's result from runs over different parts of its mutant list (same commit and tests)."""
    if not old or "parts" not in old or old.get("tests") != new.get("tests") or "error" in new or "error" in old:
        return new
    if old["commit"] != new["commit"] and subprocess.run(  # parts of one module's code at two commits
            ["git", "diff", "--quiet", old["commit"], new["commit"], "--", module], cwd=ROOT).returncode:
        return new
    done = {tuple(p) for p in old["parts"]}
    if any(tuple(p) in done for p in new["parts"]):
        return new  # a part run again replaces the earlier run
    counts = {k: old["counts"][k] + new["counts"][k] for k in new["counts"]}
    out = {**new, "parts": sorted(old["parts"] + new["parts"]), "sampled": old["sampled"] + new["sampled"],
           "tested": old["tested"] + new["tested"], "counts": counts,
           "seconds": round(old["seconds"] + new["seconds"], 1), "commit": old["commit"],
           "survivors": sorted(old["survivors"] + new["survivors"], key=lambda x: (x["line_number"], x["index"]))}
    covered = 0  # finished: the parts cover the whole mutant list
    for start, end in out["parts"]:
        covered = end if start <= covered else covered
    out["finished"] = covered >= new["mutants"]
    killed, tested = counts["killed"] + counts["timeout"], out["tested"]
    explained = sum(1 for x in out["survivors"] if x["explained"])
    out["kill_ratio"] = round(killed / tested, 3) if tested else None
    out["kill_ratio_excluding_explained"] = round(killed / (tested - explained), 3) if tested > explained else None
    return out


def _mutant_source(module: str, src: str, survivor: dict) -> str | None:
    """``src`` with ``survivor``'s mutation applied (found by its line's text), or None if that line is gone."""
    from mutmut import RelativeMutationID

    lines = src.splitlines()
    at = survivor["line_number"] - 1
    if not (0 <= at < len(lines) and lines[at] == survivor["line"]):
        same = [i for i, line in enumerate(lines) if line == survivor["line"]]
        if len(same) != 1:
            return None
        at = same[0]
    return _apply(module, src, RelativeMutationID(line=survivor["line"], index=survivor["index"], line_number=at))


def recheck_module(module: str, r: dict, clone: Path, env: dict, commit: str, tests: str | None = None) -> dict:
    """Run the current tests (the module's selection, or ``tests``) against each survivor of an earlier
    run not yet killed: killed (any test failure or collection error), survived, or gone (its line was
    removed or rewritten).  A kill is recorded with the commit whose tests killed it: at the run's own
    commit it was a wider selection of the existing tests, later new tests."""
    tests = tests or MODULES[module][0]
    path = clone / module
    src = path.read_text()
    for s in r["survivors"]:
        if s.get("recheck") == "killed":
            continue
        new = _mutant_source(module, src, s)
        if new is None:
            s["recheck"] = "gone"
            continue
        path.write_text(new)
        try:
            outcome = _run_tests(clone, env, tests, 300)
        finally:
            path.write_text(src)
        s["recheck"] = "survived" if outcome == "passed" else "killed"
        if s["recheck"] == "killed":
            s["killed_at"] = commit
        s["explained"] = EXPLAINED.get((module, s["from"], s["to"]))
    r["recheck_tests"] = tests
    left = [s for s in r["survivors"] if s.get("recheck") == "survived"]
    killed = [s for s in r["survivors"] if s.get("recheck") == "killed"]
    r["after_recheck"] = {
        # at the run's commit (--existing): the wider selection of the tests that existed; later: the wider
        # selection and the tests added since, together
        "killed_at_the_run_commit_by_the_wider_selection": sum(s.get("killed_at") == r["commit"] for s in killed),
        "killed_later_by_the_wider_selection_and_new_tests": sum(s.get("killed_at") != r["commit"] for s in killed),
        "code_removed": sum(s.get("recheck") == "gone" for s in r["survivors"]),
        "still_surviving": len(left),
        "explained": sum(bool(s["explained"]) for s in left),
        "unexplained": [f"{s['line_number']}: {s['from']} -> {s['to']}" for s in left if not s["explained"]],
    }
    tested = r["tested"] - r["after_recheck"]["code_removed"]
    r["kill_ratio_after_recheck"] = round((tested - len(left)) / tested, 3) if tested else None
    explained = r["after_recheck"]["explained"]
    r["kill_ratio_after_recheck_excluding_explained"] = (round((tested - len(left)) / (tested - explained), 3)
                                                         if tested > explained else None)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", default=list(MODULES),
                    help="MODULE or MODULE@START:END (that part of its mutant list; parts merge into one result)")
    ap.add_argument("--minutes", type=float, default=20.0, help="bound on each module's run")
    ap.add_argument("--most", type=int, default=None, help="test at most this many mutants per module "
                    "(an evenly spread sample)")
    ap.add_argument("--jobs", type=int, default=1, help="modules run at once, each in its own clone")
    ap.add_argument("--recheck", action="store_true",
                    help="rerun the current tests against the survivors recorded in mutation.json (implies --merge)")
    ap.add_argument("--wide", action="store_true", help="with --recheck: every fast test of the passes and the "
                    "core instead of the module's selection")
    ap.add_argument("--existing", action="store_true", help="with --recheck: the tests of the commit the "
                    "mutants were run on (with --wide: what a wider selection of the existing tests kills)")
    ap.add_argument("--at", default="HEAD", help="the commit to run (its code and tests)")
    ap.add_argument("--merge", action="store_true", help="keep other modules' results already in mutation.json")
    opts = ap.parse_args()
    specs = []
    for spec in opts.modules:
        module, _, part = spec.partition("@")
        specs.append((module, tuple(int(x) for x in part.split(":")) if part else None))
    unknown = [m for m, _ in specs if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    commit = subprocess.run(["git", "rev-parse", opts.at], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    old = ROOT / "benchmarks" / "results" / "mutation.json"

    def earlier() -> dict:
        return json.loads(old.read_text()).get("modules", {}) if old.exists() else {}

    previous = earlier() if opts.recheck else {}

    def one(spec: tuple[str, tuple[int, int] | None]) -> tuple[str, dict]:
        module, part = spec
        # --existing: the tests of the commit the module's mutants were run on
        at = previous[module]["commit"] if opts.recheck and opts.existing and module in previous else commit
        with tempfile.TemporaryDirectory(prefix="archpass-mutation-") as d:
            clone = Path(d) / "repo"
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
            subprocess.run(["git", "checkout", "-q", at], cwd=clone, check=True)
            env = {**os.environ, "PYTHONPATH": str(_shim(clone)), "PYTHONDONTWRITEBYTECODE": "1"}
            if opts.recheck:
                if module not in previous:
                    raise SystemExit(f"no earlier results for {module} to recheck")
                r = {**recheck_module(module, previous[module], clone, env, at,
                                              WIDE_FOR.get(module, WIDE) if opts.wide else None),
                     "recheck_commit": at}
            else:
                r = {**run_module(module, clone, env, opts.minutes, opts.most, part), "commit": commit}
        print(f"{module:28s} {part or ''} {r.get('kill_ratio')} killed of {r.get('tested')} tested ({r.get('counts')}) "
              f"after recheck {r.get('kill_ratio_after_recheck')} "
              f"{'' if r.get('finished', True) else 'NOT FINISHED '}{r.get('seconds')} s {r.get('error', '')}",
              flush=True)
        return module, r

    # each module (part) in its own clone; --jobs of them at once
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        done = list(pool.map(one, specs))
    results = earlier() if (opts.merge or opts.recheck) else {}  # read now: another run may have written meanwhile
    for module, r in done:
        results[module] = r if opts.recheck else merge_parts(module, results.get(module), r)
    total_tested = sum(r.get("tested", 0) for r in results.values())
    total_killed = sum(r["counts"]["killed"] + r["counts"]["timeout"] for r in results.values() if "counts" in r)
    left = sum(r["after_recheck"]["still_surviving"] for r in results.values() if "after_recheck" in r)
    removed = sum(r["after_recheck"]["code_removed"] for r in results.values() if "after_recheck" in r)
    unrechecked = sum(len(r.get("survivors", ())) for r in results.values() if "after_recheck" not in r)
    tested_after = total_tested - removed
    out = write_results("mutation", {"tool": "mutmut 2.5.1 mutation operators, driven by this script", "string_mutations": False,
                                     "note": "killed = any non-zero pytest exit (failures, errors, collection "
                                             "errors) or a hang; kill_ratio: the module's own test selection at "
                                             "'commit'; kill_ratio_after_recheck: survivors rerun against the "
                                             "wider selection and the new tests at 'recheck_commit', survivors "
                                             "whose code was removed left out",
                                     "overall_kill_ratio": round(total_killed / total_tested, 3) if total_tested else None,
                                     "overall_kill_ratio_after_recheck": round((tested_after - left - unrechecked) / tested_after, 3)
                                     if tested_after else None,
                                     "modules": results,
                                     **({"history": json.loads(old.read_text()).get("history")} if old.exists() and
                                        "history" in json.loads(old.read_text()) else {})})
    print(f"overall {total_killed}/{total_tested}; results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
