"""Ahead-of-time compile gate: registered Triton kernel configs for sm_80 and sm_90, and csrc with nvcc.

The Triton part runs in subprocesses without TRITON_INTERPRET (this test session runs kernels in the
interpreter, where kernels are not compilable JITFunctions), sharded so pytest-xdist can spread it.
Here it compiles one representative config per kernel x signature x specialization (shared memory and
register spills checked); the sweep over every autotune config is CI's own step (``.ci/run``)::

    python3 -m fm_engine.kernels._aot --all --jobs 2

Kernels join by calling ``fm_engine.kernels._aot.register``; ``test_every_kernel_is_registered``
fails for a launchable kernel that did not. Also checked from the sm_90 PTX, without a GPU: the relu2
element-wise kernels move 16-byte vectors, and the MLP GEMMs keep a wgmma group in flight.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=_env(), capture_output=True, text=True, timeout=1500, check=False
    )


def test_every_kernel_is_registered() -> None:
    r = _run(
        "from fm_engine.kernels import _aot; cases = _aot.all_cases(); missing = _aot.unregistered_kernels();"
        "print(len(cases)); print('\\n'.join(missing))"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert int(lines[0]) > 0, "no kernel registered any compile-gate case"
    assert lines[1:] == [], f"kernels missing from the compile gate: {lines[1:]}"


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile(arch: int, shard: int) -> None:
    r = _run(
        "import sys; from fm_engine.kernels import _aot; sys.exit(_aot.main(sys.argv[1:]))",
        f"--arch={arch}",
        f"--shard={shard}",
        f"--shards={SHARDS}",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "compiled" in r.stdout


_PTX_PROBE = """
import re, sys
from fm_engine.kernels import _aot
cases = [c for c in _aot.all_cases() if c.representative and c.aligned and c.arch in (None, 90)]
cases = [c for c in cases if c.id.startswith(sys.argv[1]) and "unaligned" not in c.name]
for c in cases:
    if sys.argv[2] not in c.id:
        continue
    ptx = _aot.compile_case(c, 90).asm["ptx"]
    mem = sorted(set(re.findall(r"(?:ld|st)\\.global(?:\\.[a-z0-9]+)*", ptx)))
    waits = sorted(set(re.findall(r"wgmma\\.wait_group\\.sync\\.aligned\\s+(\\d+)", ptx)))
    print(c.id, "|", " ".join(mem), "|", " ".join(waits))
"""


def _ptx_probe(prefix: str, contains: str) -> list[tuple[str, str, str]]:
    r = _run(_PTX_PROBE, prefix, contains)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [tuple(part.strip() for part in line.split("|")) for line in r.stdout.strip().splitlines()]
    assert rows, f"no registered case matches {prefix} / {contains}"
    return rows  # type: ignore[return-value]


def test_relu2_elementwise_moves_16_byte_vectors() -> None:
    """With aligned pointers, whole blocks load and store 16 bytes per access (v4 x 32 bit) for every dtype."""
    for prefix in ("relu2_fwd", "relu2_bwd", "relu2_mlp_act_fwd", "relu2_mlp_act_bwd"):
        for case, mem, _ in _ptx_probe(prefix, "[*"):
            assert "ld.global.v4.b32" in mem and "st.global.v4.b32" in mem, f"{case}: {mem}"


def test_relu2_mlp_gemms_keep_a_wgmma_group_in_flight() -> None:
    """Every bf16 product of the fused MLP (prologues and epilogues included, 16-aligned operands) uses wgmma
    on sm_90 and never waits for every group at each step: some wait_group N >= 1 leaves MMAs in flight (a
    B operand changed in registers compiled to wait_group 0 only, serialising the MMAs)."""
    for case, _, waits in _ptx_probe("relu2_mlp_", "*bf16"):
        if "_act_" in case:
            continue
        assert any(int(w) >= 1 for w in waits.split()), f"{case}: wgmma wait groups {waits or 'none (no wgmma)'}"


def test_gate_rejects_spilling_and_oversized_configs(tmp_path: Path) -> None:
    """A 256x256 fp32 accumulator on one warp cannot live in registers; a 3-stage 256x256x128 fp32 tile does
    not fit in shared memory: on the pinned Triton the gate fails both; a spill is only a note for configs
    registered non-strict, and for every config under another Triton (which the running one decides)."""
    (tmp_path / "spill_probe.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        "def big_dot(a_ptr, c_ptr, BM: tl.constexpr, BK: tl.constexpr):\n"
        "    acc = tl.zeros((BM, BM), tl.float32)\n"
        "    for k in range(0, 4):\n"
        "        a = tl.load(a_ptr + tl.arange(0, BM)[:, None] * BK + tl.arange(0, BK)[None, :] + k)\n"
        "        acc = tl.dot(a, tl.trans(a), acc)\n"
        "    tl.store(c_ptr + tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :], acc)\n"
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import spill_probe; from fm_engine.kernels import _aot\n"
        "sig = {'a_ptr': '*fp32', 'c_ptr': '*fp32', 'BM': 'constexpr', 'BK': 'constexpr'}\n"
        "spill = _aot.AOTCase('spill', spill_probe.big_dot, sig, {'BM': 256, 'BK': 16}, 1, 1)\n"
        "smem = _aot.AOTCase('smem', spill_probe.big_dot, sig, {'BM': 256, 'BK': 128}, 8, 3)\n"
        "import dataclasses\n"
        "print(_aot.check_case(spill, 90, pinned=True)[0]); print(_aot.check_case(smem, 80, pinned=False)[0])\n"
        "print(_aot.check_case(dataclasses.replace(spill, strict=False), 90, pinned=True))\n"
        "print(_aot.check_case(spill, 90, pinned=False)); print(_aot.check_case(spill, 90))\n"
        "print(_aot.pinned_toolchain())\n"
    )
    r = _run(code, str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    spill, smem, lenient, other_triton, here, pinned = r.stdout.strip().splitlines()[-6:]
    assert spill.startswith("spills registers"), spill
    assert "shared memory" in smem, smem  # a failure under any Triton
    assert lenient.startswith("(None, 'spills registers"), lenient  # non-strict configs: reported, not failed
    assert other_triton.startswith("(None, 'spills registers"), other_triton  # another Triton: a note
    assert here == (f"('{spill}', None)" if pinned == "True" else other_triton), (here, pinned)


def test_spills_fail_on_the_pinned_triton_only() -> None:
    """The gate is strict where its candidate lists were chosen: the Triton that CI pins (.ci/constraints.txt)
    and the GPU machines run; with any other Triton installed its spills are notes."""
    pins = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    (pin,) = [line.split("==")[1].strip() for line in pins if line.strip().startswith("triton==")]
    r = _run(
        "import triton; from fm_engine.kernels import _aot; print(_aot.PINNED_TRITON, triton.__version__);"
        "print(_aot.pinned_toolchain())"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (pinned_here, running), (strict,) = (line.split() for line in r.stdout.strip().splitlines()[-2:])
    assert pinned_here == pin, f"kernels/_aot.py pins Triton {pinned_here}, .ci/constraints.txt {pin}"
    assert strict == str(running == pin)


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_csrc_compiles_with_nvcc(arch: str, tmp_path: Path) -> None:
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "no CUDA sources in csrc/"
    for src in sources:
        r = subprocess.run(
            [
                NVCC,
                "-c",
                str(src),
                f"-arch={arch}",
                "-std=c++17",
                "-O2",
                "-I",
                str(ROOT / "csrc"),
                "-o",
                str(tmp_path / (src.stem + ".o")),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert r.returncode == 0, f"{src.name} for {arch}:\n{r.stderr[-4000:]}"
