"""The benchmark workloads that drive the wire directly still run against the node.

The benchmarks are not timed here (their figures come from full runs, README); this only
checks that the code they run still works with the node's own API, which a change to the
wire can break without any test of the node noticing (it did: a custom upload method).
"""

from __future__ import annotations

import os
import subprocess
import sys


def test_the_rpc_workloads_run_quickly() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "triode", "bench", "rpc", "--quick"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRIODE_BUILDGRID": ""},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAILED" not in run.stdout + run.stderr
    assert "rpc.stream" in run.stdout and "rpc.unary" in run.stdout
