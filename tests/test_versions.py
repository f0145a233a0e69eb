"""The declared dependency ranges start where CI tests: the lower bounds of torch and Triton in pyproject.toml
are the releases CI's pinned leg installs (.ci/constraints.txt); the newest leg (.ci/newest) tests the other
end, whatever pip resolves on the day. Also checks the running interpreter is inside the declared Python range."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _release(text: str) -> tuple[int, ...]:
    """(2, 13, 0) for "2.13", "2.13.0" or "2.13.0+cpu": the release part, padded to three numbers."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    assert m is not None, text
    parts = [int(p) for p in m.group().split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*(\S+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _lower_bounds(requirements: list[str], name: str) -> list[str]:
    found = []
    for req in requirements:
        m = re.match(rf"\s*{re.escape(name)}\s*(\[[^\]]*\])?\s*(.*)$", req, re.I)
        if m is None or re.match(r"[A-Za-z0-9_.-]", m.group(2) or ""):
            continue  # another package whose name starts with this one
        bound = re.search(r">=\s*([0-9][^,;\s]*)", m.group(2))
        assert bound is not None, f"{req!r}: give {name} a lower bound (the release CI's pinned leg tests)"
        found.append(bound.group(1))
    return found


def test_lower_bounds_are_the_pinned_releases() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    for name in ("torch", "triton"):
        bounds = {group: b for group, reqs in groups.items() for b in _lower_bounds(reqs, name)}
        assert bounds, f"pyproject.toml declares no {name} requirement"
        for group, bound in bounds.items():
            assert _release(bound) == _release(pins[name]), (
                f"pyproject.toml [{group}] says {name}>={bound} but CI's pinned leg tests {name}=={pins[name]} "
                "(.ci/constraints.txt): the declared lower end must be the tested one"
            )


def test_this_python_is_in_the_declared_range() -> None:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec.strip())
    assert m is not None, f"requires-python {spec!r}: expected '>=X.Y'"
    assert sys.version_info[:2] >= (int(m.group(1)), int(m.group(2))), (spec, sys.version)
