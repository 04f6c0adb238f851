"""The skip policy of the testing plugin: with `--only-machine-skips` (what `make test`
runs) a skip for anything but a missing GPU or real ComfyUI fails the run."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest
from model_service_testing import machine

def test_runs():
    pass

@machine.needs_real_comfyui
def test_on_a_real_comfyui():
    pass

def test_gpu():
    pytest.skip("no GPU: this one needs CUDA")
"""


PROJECT_FILE_SKIP = 'import pytest\n\ndef test_x():\n    pytest.skip("a.json missing")\n'


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("COMFYUI_TEST_DIR", raising=False)
    pytester.makepyfile(test_machine=TESTS)
    return pytester


def test_machine_skips_pass_and_are_listed_by_reason(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("--only-machine-skips", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*skips by reason*", "*[[]machine[]] no GPU*"])


def test_another_skip_fails_the_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_file='import pytest\n\ndef test_x():\n    pytest.skip("a.json missing")\n'
    )
    result = suite.runpytest_subprocess("--only-machine-skips", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*[[]NOT ALLOWED[]] a.json missing*", "*the run fails*"])


def test_without_the_option_a_skip_is_only_reported(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_file='import pytest\n\ndef test_x():\n    pytest.skip("a.json missing")\n'
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*[[]NOT ALLOWED[]] a.json missing*"])
