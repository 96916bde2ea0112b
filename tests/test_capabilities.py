"""The CPU kernels of every instruction set this machine can run, not only the best.

The kernels are compiled for DEFAULT, AVX2 and AVX-512 and the best one the CPU
supports is picked at run time; developer and CI machines differ (some expose
AVX-512, some only AVX2), so the main test run exercises different code on each.
Here the op tests run again in a subprocess under each lower capability the machine
supports, chosen with ATEN_CPU_CAPABILITY as for ATen's own kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.fused_only]

TESTS = Path(__file__).parent
# The files whose cases run the CPU kernels' value and gradient paths.
OP_TESTS = [
    "test_bernoulli.py",
    "test_gaussian.py",
    "test_kl.py",
    "test_elbo.py",
    "test_targets.py",
    "test_reparameterize.py",
    "test_accuracy.py",
]
CAPABILITIES = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}


def _chosen(setting: str) -> str:
    """The capability vae_fast picks under ATEN_CPU_CAPABILITY=setting."""
    code = "import vae_fast; print(vae_fast._C.cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": setting}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_environment_caps_the_capability():
    # Asking for a capability gives it, or the best lower one the CPU has.
    order = list(CAPABILITIES.values())
    for setting, name in CAPABILITIES.items():
        assert order.index(_chosen(setting)) <= order.index(name)
    assert _chosen("default") == "DEFAULT"


@pytest.mark.parametrize("setting", ["default", "avx2"])
def test_op_suite_under_a_lower_capability(setting):
    best = _chosen("avx512")
    if _chosen(setting) != CAPABILITIES[setting] or CAPABILITIES[setting] == best:
        pytest.skip(f"{setting} is not a lower capability this CPU runs (best: {best})")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": setting}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        *(str(TESTS / name) for name in OP_TESTS),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
