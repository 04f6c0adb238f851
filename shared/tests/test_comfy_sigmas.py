"""The σ arithmetic the fidelity tests use (`model_service_testing.comfy_sigmas`) is
ComfyUI 0.33.0's: known values, and (with COMFYUI_TEST_DIR) the real ComfyUI's own
`calculate_sigmas` run by its own interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model_service_testing import machine
from model_service_testing.comfy_sigmas import schedule

CASES = [
    # (scheduler, steps, shift): what each service's graphs ran or run
    ("simple", 3, 5.0),  # FastWan before the distilled schedule
    ("simple", 4, 5.0),  # Wan2.2-14B Lightning, 4 steps at shift 5
    ("simple", 6, 8.0),  # InfiniteTalk before the template's scheduler
    ("normal", 6, 8.0),  # InfiniteTalk now (the template's)
    ("simple", 20, 5.0),  # Wan2.2-14B full mode
]
KNOWN = {
    ("simple", 3, 5.0): [1.0, 0.909215, 0.714897, 0.0],
    ("simple", 4, 5.0): [1.0, 0.9375, 0.833333, 0.625, 0.0],
    ("simple", 6, 8.0): [1.0, 0.975724, 0.941259, 0.888889, 0.800479, 0.615952, 0.0],
    ("normal", 6, 8.0): [1.0, 0.969988, 0.924013, 0.844723, 0.675333, 0.060207, 0.0],
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_schedules(case: tuple[str, int, float]) -> None:
    assert schedule(*case) == pytest.approx(KNOWN[case], abs=1e-6)


@machine.needs_real_comfyui
def test_the_same_as_the_real_comfyuis_own_schedulers() -> None:
    script = (
        "import sys, json\n"
        "sys.argv = ['sigmas', '--cpu']\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"
        "import comfy.model_sampling as ms, comfy.samplers as s\n"
        "out = []\n"
        "for name, steps, shift in json.loads(sys.stdin.read()):\n"
        "    m = ms.ModelSamplingDiscreteFlow(None)\n"
        "    m.set_parameters(shift=shift)\n"
        "    out.append(s.calculate_sigmas(m, name, steps).tolist())\n"
        "print(json.dumps(out))\n"
    )
    python = os.environ.get("COMFYUI_TEST_PYTHON") or sys.executable
    result = subprocess.run(
        [python, "-c", script],
        input=json.dumps(CASES),
        cwd=machine.COMFYUI_TEST_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    real = json.loads(result.stdout.strip().splitlines()[-1])
    for case, sigmas in zip(CASES, real, strict=True):
        assert schedule(*case) == pytest.approx(sigmas, abs=1e-5), case
