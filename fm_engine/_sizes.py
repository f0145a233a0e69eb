"""Size rounding shared by the kernel autotuner and the dispatch evidence (a leaf: imports nothing from fm_engine).

Both key their tables by sizes rounded up to powers of two, with the same :func:`pow2`, so a size
means the same bucket in ``kernels/_autotune.py``'s tuning cache and in ``fm_engine.ops._evidence``'s
tuning tables.
"""

from __future__ import annotations


def pow2(n: int) -> int:
    """The smallest power of two >= ``n``; 1 for every ``n`` <= 1 (0 and negative sizes included).

    The result is always a power of two (1 = 2**0), so a bucket's sizes can be compared on a log scale.
    """
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
