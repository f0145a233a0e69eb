"""The guard of tests/conftest.py: a test that changes TRITON_INTERPRET inside the test process fails, and
the kernel modules are imported (in the process's one mode) before any test runs.

The flips run in a pytest subprocess (with tests/conftest.py loaded as a plugin), so this process never
changes mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def test_a_flip_of_triton_interpret_fails_the_test_that_made_it(tmp_path: Path) -> None:
    before = os.environ.get("TRITON_INTERPRET")
    other = "0" if before == "1" else "1"
    (tmp_path / "test_flips.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import sys

            import pytest


            @pytest.fixture
            def flipped_in_setup(monkeypatch):
                monkeypatch.setenv("TRITON_INTERPRET", {other!r})


            def test_flip_with_monkeypatch(monkeypatch):
                monkeypatch.setenv("TRITON_INTERPRET", {other!r})


            def test_flip_by_hand():
                os.environ["TRITON_INTERPRET"] = {other!r}


            def test_flip_in_a_fixture(flipped_in_setup):
                pass


            def test_same_value_is_no_flip(monkeypatch):
                before = {before!r}
                if before is not None:
                    monkeypatch.setenv("TRITON_INTERPRET", before)


            def test_zz_the_value_was_put_back():
                assert os.environ.get("TRITON_INTERPRET") == {before!r}


            def test_kernel_modules_were_imported_before_any_test():
                assert {{"fm_engine.kernels.relu2", "fm_engine.kernels.cross_attention"}} <= set(sys.modules)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "--junitxml=report.xml"]
        + ["test_flips.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    # per test: the message of its failure (call) or error (setup), "" when it passed
    cases = {
        case.get("name"): " ".join(f.get("message", "") for f in case if f.tag in ("failure", "error"))
        for case in ElementTree.parse(tmp_path / "report.xml").iter("testcase")
    }
    assert set(cases) == {
        "test_flip_with_monkeypatch",
        "test_flip_by_hand",
        "test_flip_in_a_fixture",
        "test_same_value_is_no_flip",
        "test_zz_the_value_was_put_back",
        "test_kernel_modules_were_imported_before_any_test",
    }, out
    for name, when in (
        ("test_flip_with_monkeypatch", "call"),
        ("test_flip_by_hand", "call"),
        ("test_flip_in_a_fixture", "setup"),
    ):
        assert (
            f"changed TRITON_INTERPRET from {before!r} to {other!r} inside the test process ({when})" in cases[name]
        ), (name, out)
    for name in (
        "test_same_value_is_no_flip",
        "test_zz_the_value_was_put_back",
        "test_kernel_modules_were_imported_before_any_test",
    ):
        assert cases[name] == "", (name, out)
    assert os.environ.get("TRITON_INTERPRET") == before
