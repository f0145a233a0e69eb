"""Build: the Python packages, plus the CUDA extension fm_engine._C when nvcc is present.

``kernels/`` is installed as ``fm_engine.kernels`` and ``benchmarks/`` as ``fm_engine.benchmarks``.
The extension is configured by CMakeLists.txt (pybind11, static cudart, no libtorch) and is
skipped when nvcc is not found or ``FM_ENGINE_BUILD_CUDA=0``; fm_engine then runs without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    if os.environ.get("FM_ENGINE_BUILD_CUDA", "1") == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError as e:  # --no-build-isolation without pybind11 installed
            raise RuntimeError(
                "fm_engine: nvcc was found, so the CUDA extension is being built, but pybind11 is not installed; "
                "install pybind11 and cmake, or set FM_ENGINE_BUILD_CUDA=0 to build without the extension"
            ) from e
        if shutil.which("cmake") is None:
            raise RuntimeError(
                "fm_engine: nvcc was found but cmake is not on PATH; install cmake, or set FM_ENGINE_BUILD_CUDA=0"
            )

        nvcc = find_nvcc()
        assert nvcc is not None
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("FM_ENGINE_CUDA_ARCHS", "80;90a")
        cfg = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFM_ENGINE_OUTPUT_DIR={out.parent}",
            f"-DFM_ENGINE_OUTPUT_NAME={out.name}",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        subprocess.check_call(cfg, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_dir)
        if not out.exists():
            raise RuntimeError(f"CMake build finished but {out} was not produced")


nvcc = find_nvcc()
if nvcc is None:
    print("fm_engine: nvcc not found or FM_ENGINE_BUILD_CUDA=0: skipping the CUDA extension", file=sys.stderr)

packages = find_packages(include=["fm_engine", "fm_engine.*"])
packages += ["fm_engine.kernels", "fm_engine.kernels.window_attention", "fm_engine.benchmarks"]

setup(
    packages=packages,
    package_dir={"fm_engine.kernels": "kernels", "fm_engine.benchmarks": "benchmarks"},
    package_data={"fm_engine": ["evidence/*.json"]},
    ext_modules=[CMakeExtension("fm_engine._C")] if nvcc else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
