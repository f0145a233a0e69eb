"""Measured evidence for automatic dispatch: which backend is fastest for a call, on this device class.

The first GPU run (H200, 2026-11-30) showed fast kernels losing to the eager reference for 9 of 14
op cases, so ``auto`` never guesses: it runs a fast backend only where a measurement put it.

**Buckets.** Each op maps a call to a :class:`Bucket`: *flags* that change the kernel (dtype, causal,
mask, dropout, head dim, grad required, ...) and *sizes* rounded up to powers of two. The key text is
``"flag=v,...|size=n,..."``.

**Tables.** JSON files, one per device class (``fm_engine._device.device_class``)::

    {"format": "fm_engine.evidence", "version": 1, "device_class": "NVIDIA H200 sm_90",
     "ops": {"relu2_mlp": {"<bucket key>": {
         "backends": {"reference": {"fwd_ms": 0.49, "fwd_bwd_ms": 1.54}, "triton": {...}},
         "torch": "2.11.0+cu130", "triton": "3.6.0", "date": "2026-11-30", "source": "..."}}}}

Every entry times the reference under each metric (``fwd_ms``, ``fwd_bwd_ms``) that one of its fast
backends reports: a table with an entry that does not is corrupt (a fast time alone says nothing).

Looked up in order: the user's table ``cache_dir()/tables/<slug>.json`` (written by ``fm-engine tune``),
then the package's ``fm_engine/evidence/<slug>.json`` (from committed GPU runs); a user entry replaces
the package entry of the same bucket. A corrupt file, a wrong format version, or a table whose
``device_class`` is not this device's is skipped with one warning naming the file and the reason.

**Kernel versions.** Each measured fast backend records a short hash of the kernel source that implements
it: the files the backend declared when it was registered (``Op.register(..., sources=...)``: for Triton
``kernels/<op>.py`` and the kernel modules it imports; for CUDA ``csrc/<op>.cu`` or, in an installed
package, the built extension; for ``compile`` the module of the op's reference, declared by ``Op`` itself).
A measurement of other code than the one installed is ignored: after a kernel changes, ``auto`` runs the reference there
until ``fm-engine tune`` measures the new kernel.

**Choice** (:func:`measured_order`): the bucket's entry, else the nearest measured bucket of the same op and
flags with every size within a factor of 4; among the backends measured there that accept the call,
the fastest by forward + backward time when the call needs gradients, forward time otherwise; a fast
backend must beat the reference by more than 3%, else the reference runs. No entry: the reference.
Nothing is ever timed inside a normal call.

Under ``torch.compile`` the choice is made once at trace time: :func:`measured_order` and
:func:`device_class_of` are marked as constant results (what ``torch.compiler.assume_constant_result``
does), so dynamo calls them eagerly (file reads included) and bakes the result into the graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fm_engine import _device
from fm_engine._env import interpreting  # noqa: F401  (E.interpreting(), as before)
from fm_engine._sizes import pow2

FORMAT = "fm_engine.evidence"
VERSION = 1
REFERENCE = "reference"
MARGIN = 0.97  # a fast backend runs only when faster than 0.97x the reference's time
NEAR = 2  # nearest-bucket search: each size within 2 powers of two (a factor of 4)


class EvidenceWarning(UserWarning):
    """A tuning table was skipped (corrupt, wrong version, or measured on another device class)."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    """flags: exact values that change the kernel; sizes: powers of two."""

    flags: tuple[tuple[str, str], ...]
    sizes: tuple[tuple[str, int], ...]

    @property
    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.flags) + "|" + ",".join(f"{k}={v}" for k, v in self.sizes)

    @property
    def grad(self) -> bool:
        return dict(self.flags).get("grad") == "1"

    @staticmethod
    def parse(key: str) -> Bucket:
        flags_txt, _, sizes_txt = key.partition("|")

        def pairs(txt: str) -> list[tuple[str, str]]:
            return [tuple(p.split("=", 1)) for p in txt.split(",") if p]  # type: ignore[misc]

        return Bucket(tuple(pairs(flags_txt)), tuple((k, int(v)) for k, v in pairs(sizes_txt)))


def _flag(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


def requires_grad(*tensors: Any) -> bool:
    """True when autograd will record the call: grad mode on and a floating input requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def make_bucket(flags: Mapping[str, Any], sizes: Mapping[str, int]) -> Bucket:
    """A bucket from flag values (kept exactly) and sizes (rounded up to powers of two)."""
    return Bucket(tuple((k, _flag(v)) for k, v in flags.items()), tuple((k, pow2(v)) for k, v in sizes.items()))


# --- tables ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """One table file as found on disk. ``problem`` is why it is not used (None: used)."""

    path: Path
    origin: str  # "user" or "package"
    device_class: str | None
    ops: dict[str, dict[str, dict[str, Any]]]
    sha256: str
    problem: str | None = None

    @property
    def entries(self) -> int:
        return sum(len(v) for v in self.ops.values())


def package_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "evidence"


def user_dir() -> Path:
    return _device.cache_dir() / "tables"


def table_path(origin: str, device_class_name: str) -> Path:
    base = user_dir() if origin == "user" else package_dir()
    return base / f"{_device.slug(device_class_name)}.json"


def _reference_problem(backends: Mapping[str, Any]) -> str | None:
    """Why an entry's times cannot be compared with the reference's (None: they can).

    A fast backend's time means something only next to the reference's time under the same metric, so an
    entry must time the reference under every metric any of its fast backends reports."""
    ref = backends.get(REFERENCE)
    if not isinstance(ref, dict):
        return "has no reference time (every entry must time the reference)"
    for m in ("fwd_ms", "fwd_bwd_ms"):
        timed = sorted(b for b, t in backends.items() if b != REFERENCE and m in t)
        if timed and m not in ref:
            return f"has no reference time for {m} (measured for {', '.join(timed)})"
    return None


def _validate_ops(ops: Any) -> str | None:
    if not isinstance(ops, dict):
        return "'ops' is not an object"
    for op, buckets in ops.items():
        if not isinstance(buckets, dict):
            return f"ops[{op!r}] is not an object"
        for key, entry in buckets.items():
            backends = entry.get("backends") if isinstance(entry, dict) else None
            if not isinstance(backends, dict) or not backends:
                return f"ops[{op!r}][{key!r}] has no 'backends' object"
            for b, t in backends.items():
                if not isinstance(t, dict) or not all(
                    isinstance(t.get(m), (int, float)) and math.isfinite(t[m]) and t[m] > 0
                    for m in ("fwd_ms", "fwd_bwd_ms")
                    if m in t
                ):
                    return f"ops[{op!r}][{key!r}] backend {b!r}: times must be positive numbers"
            problem = _reference_problem(backends)
            if problem:
                return f"ops[{op!r}][{key!r}] {problem}"
            try:
                Bucket.parse(key)
            except ValueError:
                return f"bucket key {key!r} is malformed"
    return None


def read_table(path: Path, origin: str, expect_class: str | None) -> Table:
    """Read one table; ``problem`` says why it must not be used (corrupt, version, device class)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return Table(path, origin, None, {}, "", f"unreadable ({e.__class__.__name__}: {e})")
    sha = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return Table(path, origin, None, {}, sha, f"corrupt JSON ({e})")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return Table(path, origin, None, {}, sha, f"not an fm_engine evidence table (format != {FORMAT!r})")
    if data.get("version") != VERSION:
        return Table(path, origin, None, {}, sha, f"format version {data.get('version')!r}, expected {VERSION}")
    cls = data.get("device_class")
    ops = data.get("ops", {})
    problem = _validate_ops(ops)
    if problem:
        return Table(path, origin, cls, {}, sha, f"corrupt ({problem})")
    if expect_class is not None and cls != expect_class:
        return Table(path, origin, cls, ops, sha, f"measured on {cls!r}, not on this device ({expect_class!r})")
    return Table(path, origin, cls, ops, sha)


_warned: set[tuple[str, str]] = set()


def _warn_once(table: Table) -> None:
    assert table.problem is not None
    key = (str(table.path), table.problem)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fm_engine: tuning table {table.path} skipped: {table.problem}", EvidenceWarning, stacklevel=3)


@dataclasses.dataclass
class Merged:
    """Every usable entry for one device class: ops -> bucket key -> (entry, table)."""

    device_class: str
    tables: list[Table]
    ops: dict[str, dict[str, tuple[dict[str, Any], Table]]]

    @property
    def sha256(self) -> str:
        """Hash of the tables in use (stored in training checkpoints; empty when none)."""
        used = [t for t in self.tables if t.problem is None]
        if not used:
            return ""
        return hashlib.sha256("".join(t.sha256 for t in used).encode()).hexdigest()


_merged: dict[str, Merged] = {}
_choice_cache: dict[tuple, tuple] = {}


def reload() -> None:
    """Forget loaded tables and cached choices (after ``fm-engine tune`` or a change of FM_ENGINE_CACHE_DIR)."""
    _merged.clear()
    _choice_cache.clear()


def tables(device_class_name: str) -> Merged:
    """The usable tables of one device class, the user's first (loaded once per process)."""
    m = _merged.get(device_class_name)
    if m is not None:
        return m
    found: list[Table] = []
    ops: dict[str, dict[str, tuple[dict[str, Any], Table]]] = {}
    for origin in ("package", "user"):  # user entries replace package entries of the same bucket
        path = table_path(origin, device_class_name)
        if not path.exists():
            continue
        t = read_table(path, origin, device_class_name)
        found.append(t)
        if t.problem:
            _warn_once(t)
            continue
        for op, buckets in t.ops.items():
            for key, entry in buckets.items():
                ops.setdefault(op, {})[key] = (entry, t)
    m = Merged(device_class_name, found[::-1], ops)
    _merged[device_class_name] = m
    return m


def in_use(device_class_name: str) -> dict[str, Any]:
    """What automatic dispatch reads on this device class: the tables (path, origin, sha256) and one hash of
    them all ("" when there are none). Training runs log this and keep it in their checkpoints."""
    m = tables(device_class_name)
    used = [t for t in m.tables if t.problem is None]
    return {
        "device_class": device_class_name,
        "tables": [{"path": str(t.path), "origin": t.origin, "sha256": t.sha256, "entries": t.entries} for t in used],
        "sha256": m.sha256,
    }


def all_tables() -> list[Table]:
    """Every table file in the user and package folders, whatever its device class (``fm-engine info``)."""
    out = []
    for origin, base in (("user", user_dir()), ("package", package_dir())):
        if base.is_dir():
            for path in sorted(base.glob("*.json")):
                out.append(read_table(path, origin, None))
    return out


# --- lookup and choice -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Match:
    bucket: str  # the bucket measured (the call's own, or the nearest)
    exact: bool
    entry: dict[str, Any]
    table: Table


def _distance(a: Bucket, b: Bucket) -> int | None:
    """Sum of |log2| size ratios when flags are equal and every size within a factor of 4, else None."""
    if a.flags != b.flags or [k for k, _ in a.sizes] != [k for k, _ in b.sizes]:
        return None
    total = 0
    for (_, x), (_, y) in zip(a.sizes, b.sizes, strict=True):
        d = abs(int(math.log2(max(x, 1))) - int(math.log2(max(y, 1))))
        if d > NEAR:
            return None
        total += d
    return total


def lookup(device_class_name: str, op: str, bucket: Bucket) -> Match | None:
    """The entry of ``bucket``, else the nearest measured bucket (ties: the smaller key text), else None."""
    entries = tables(device_class_name).ops.get(op)
    if not entries:
        return None
    hit = entries.get(bucket.key)
    if hit is not None:
        return Match(bucket.key, True, hit[0], hit[1])
    best: tuple[int, str] | None = None
    for key in entries:
        d = _distance(bucket, Bucket.parse(key))
        if d is not None and (best is None or (d, key) < best):
            best = (d, key)
    if best is None:
        return None
    entry, table = entries[best[1]]
    return Match(best[1], False, entry, table)


def metric(grad: bool) -> str:
    return "fwd_bwd_ms" if grad else "fwd_ms"


_versions: dict[tuple[str, str], str | None] = {}


# The sources each fast backend declared at registration (Op.register(..., sources=...)): file paths, or
# module names resolved to their file when a version is first asked for.
_sources: dict[tuple[str, str], tuple[str | Path, ...]] = {}


def declare_sources(op: str, backend: str, sources: Iterable[str | Path]) -> None:
    """Record the files whose text is ``backend`` of ``op``: its kernel version hashes them, in this order.

    Each item is a file path or a dotted module name (``"fm_engine.kernels.relu2"``: its file, a package's
    ``__init__.py``), resolved when the version is first computed. Declaring again replaces the list."""
    items = tuple(sources)
    for item in items:
        if not isinstance(item, (str, Path)):
            raise TypeError(f"sources of {op}/{backend}: expected file paths or module names, got {item!r}")
    _sources[(op, backend)] = items
    _versions.pop((op, backend), None)


def _module_file(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec and spec.origin else None


def source_files(op: str, backend: str) -> list[Path]:
    """The declared sources of ``backend`` of ``op`` as files (module names resolved; ones not found left out)."""
    files = []
    for item in _sources.get((op, backend), ()):
        path = _module_file(item) if isinstance(item, str) else Path(item)
        if path is not None:
            files.append(path)
    return files


def backend_version(op: str, backend: str) -> str | None:
    """Short hash of the source implementing ``backend`` of ``op`` (None for the reference or unknown code)."""
    key = (op, backend)
    if key not in _versions:
        if backend == REFERENCE:
            _versions[key] = None
        else:
            h = hashlib.sha256()
            try:
                files = source_files(op, backend)
                for path in files:
                    h.update(path.read_bytes())
                _versions[key] = h.hexdigest()[:12] if files else None
            except (OSError, KeyError):
                _versions[key] = None
    return _versions[key]


def stale(op: str, backend: str, times: Mapping[str, Any]) -> bool:
    """True when the measurement was of other code than the installed backend."""
    recorded = times.get("version")
    return recorded is not None and recorded != backend_version(op, backend)


def ranking(match: Match, grad: bool, op: str | None = None) -> tuple[float | None, list[tuple[str, float]]]:
    """(reference time, [(fast backend, time)] fastest first) under the call's metric; with ``op``, measurements
    of other kernel versions than the installed ones are left out."""
    m = metric(grad)
    backends = match.entry["backends"]
    ref = backends.get(REFERENCE, {}).get(m)
    fast = sorted((t[m], b) for b, t in backends.items() if b != REFERENCE and m in t and not (op and stale(op, b, t)))
    return ref, [(b, t) for t, b in fast]


def _constant_under_compile(fn: Any) -> Any:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does (that function only sets this
    attribute; tests/test_evidence.py checks it still does), without importing torch._dynamo here: that
    import costs about a second and imports triton.language, which must not happen before a program
    sets TRITON_INTERPRET."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def measured_order(device_class_name: str, op: str, bucket_key: str) -> str:
    """Fast backends that beat the reference by the margin at this bucket (or the nearest), fastest
    first, as "a,b" ("" when none). Pure function of the tables: dynamo calls it at trace time."""
    cache_key = (device_class_name, op, bucket_key)
    hit = _choice_cache.get(cache_key)
    if hit is not None:
        return hit[0]
    bucket = Bucket.parse(bucket_key)
    match = lookup(device_class_name, op, bucket)
    order = ""
    if match is not None:
        ref, fast = ranking(match, bucket.grad, op)
        if ref is not None:
            order = ",".join(b for b, t in fast if t < MARGIN * ref)
    _choice_cache[cache_key] = (order,)
    return order


@_constant_under_compile
def device_class_of(device_type: str, index: int) -> str:
    """``_device.device_class`` for a device given as plain values (constant under torch.compile)."""
    key = ("device", device_type, index)
    hit = _choice_cache.get(key)
    if hit is None:
        dev = torch.device(device_type, index) if index >= 0 else torch.device(device_type)
        hit = (_device.device_class(dev),)
        _choice_cache[key] = hit
    return hit[0]


def describe(device_class_name: str, op: str, bucket: Bucket, accepted: Iterable[str]) -> list[str]:
    """Lines for ``explain``: the evidence per backend and what it implies."""
    match = lookup(device_class_name, op, bucket)
    if match is None:
        return [
            f"evidence: none for {op} at bucket {bucket.key} on {device_class_name} "
            "-> reference (`fm-engine tune` measures it)"
        ]
    ref, fast = ranking(match, bucket.grad, op)
    e = match.entry
    table = match.table
    where = f"measured on {table.device_class} {e.get('date', '?')} ({table.origin} table {table.path.name})"
    head = "bucket" if match.exact else "nearest measured bucket"
    lines = [f"evidence at {head} {match.bucket} ({'fwd+bwd' if bucket.grad else 'fwd'} time), {where}:"]
    ok = set(accepted)
    chosen = REFERENCE
    for b, t in fast:
        ratio = f"{ref / t:.2f}x the reference" if ref else "no reference time"
        usable = "" if b in ok else " (does not accept this call)"
        lines.append(f"  {b:<10} {t:.4g} ms, {ratio}{usable}")
        if chosen == REFERENCE and b in ok and ref is not None and t < MARGIN * ref:
            chosen = b
    m = metric(bucket.grad)
    for b, times in e["backends"].items():
        if b != REFERENCE and m in times and stale(op, b, times):
            lines.append(f"  {b:<10} {times[m]:.4g} ms, measured on another version of its kernels: ignored")
    lines.append(f"  {REFERENCE:<10} {ref:.4g} ms" if ref is not None else f"  {REFERENCE:<10} not measured")
    lines.append(f"  -> {chosen}")
    return lines


# --- writing tables ----------------------------------------------------------------------------


def empty_table(device_class_name: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "device_class": device_class_name, "ops": {}}


def load_for_update(path: Path, device_class_name: str) -> dict[str, Any]:
    """The table at ``path`` as a dict to add entries to (a fresh one when missing or unusable)."""
    if path.exists():
        t = read_table(path, "user", device_class_name)
        if t.problem is None:
            return json.loads(path.read_text())
        warnings.warn(f"fm_engine: replacing unusable table {path}: {t.problem}", EvidenceWarning, stacklevel=2)
    return empty_table(device_class_name)


def write_table(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a table), keys sorted for reviewable diffs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def environment_stamp() -> dict[str, str]:
    out = {"torch": str(torch.__version__)}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton missing
        out["triton"] = "none"
    return out
