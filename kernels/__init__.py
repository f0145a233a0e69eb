"""Triton kernels, one module per op family; installed as ``fm_engine.kernels``.

Every kernel registers the launch configurations it can be compiled with in
:mod:`fm_engine.kernels._aot`, which the ahead-of-time compile gate (tests/test_compile_gate.py)
compiles for sm_80 and sm_90 without a GPU. Modules here import Triton at import time, so only the
ops' Triton backends import them, lazily.
"""
