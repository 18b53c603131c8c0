"""A user evaluator for the search tests (``--evaluator "python eval_cmd.py {model} ..."``).

Prints ``{"convs": N, "params": P}`` as its last stdout line: the candidate ONNX's Conv
count and parameter count, read with onnx (a real measurement of the file it is given).
The trial number comes from the candidate's file name (``trial<N>.onnx``, as archpass
writes it), so a test can make chosen trials go wrong:

* ``--fail-on N,...``: write a traceback-like message to stderr and exit with code 3;
* ``--hang-on N,...``: sleep for an hour (``--evaluator-timeout`` must kill it);
* ``--garbage-on N,...``: print no JSON.

With ``ARCHPASS_TEST_HANG_FLAG=FILE`` in the environment, the first run writes its pid
to FILE and sleeps for an hour (a worker to be killed in the middle of an evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def _numbers(text: str) -> set[int]:
    return {int(x) for x in text.split(",") if x.strip()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--fail-on", default="")
    ap.add_argument("--hang-on", default="")
    ap.add_argument("--garbage-on", default="")
    args = ap.parse_args()
    flag = os.environ.get("ARCHPASS_TEST_HANG_FLAG")
    if flag:
        with open(flag + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(flag + ".tmp", flag)
        time.sleep(3600)
    m = re.search(r"trial(\d+)\.onnx$", args.model)
    n = int(m.group(1)) if m else -1
    if n in _numbers(args.fail_on):
        print(f"evaluating {args.model}", file=sys.stderr)
        print(f"RuntimeError: out of memory while evaluating trial {n}", file=sys.stderr)
        return 3
    if n in _numbers(args.hang_on):
        print(f"trial {n}: waiting for a GPU", file=sys.stderr, flush=True)
        time.sleep(3600)
    if n in _numbers(args.garbage_on):
        print("accuracy: very good")
        return 0
    import numpy as np
    import onnx

    g = onnx.load(args.model).graph
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    print(json.dumps({"convs": sum(n.op_type == "Conv" for n in g.node), "params": params}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
