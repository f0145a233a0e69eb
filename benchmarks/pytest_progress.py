"""pytest plugin of benchmarks/gpu_suite.sh: append each test's outcome to ``$FM_ENGINE_SUITE_TESTLOG`` (JSON lines)
the moment the test ends, so a test stage killed by its budget still reports every test that finished.

Loaded with ``-p benchmarks.pytest_progress``; does nothing without the environment variable. Under
pytest-xdist the controller writes (workers' reports reach it), the workers do not.
"""

from __future__ import annotations

import json
import os
from typing import Any

_config: Any = None


def pytest_configure(config: Any) -> None:
    global _config
    _config = config


def pytest_runtest_logreport(report: Any) -> None:
    path = os.environ.get("FM_ENGINE_SUITE_TESTLOG")
    if not path or (_config is not None and hasattr(_config, "workerinput")):
        return
    # one line per test: its call phase, or the setup / teardown phase that failed or skipped it
    if (
        report.when == "call"
        or (report.when == "setup" and not report.passed)
        or (report.when == "teardown" and report.failed)
    ):
        outcome = "error" if report.failed and report.when != "call" else report.outcome
        line = json.dumps({"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3)})
        with open(path, "a") as f:
            f.write(line + "\n")
