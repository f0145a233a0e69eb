"""Block strings and window sizing across resolution levels for ST-CNNT (docs/MODELS.md 2.8).

A block string such as ``"L1G1T1"`` is read in pairs: a letter for the attention (L local, G global,
T temporal, V ViT-style) and a digit for the mixer (1 on, 0 off).

Window sizing: a level at resolution H x W uses a window (pixels) and a patch (pixels) per axis.

* ``keep_num_window``: keep the number of windows and of patches per window:
  window = H // num_wind, patch = window // num_patch (each count at least 2, each size at least 1);
* ``keep_window_size``: keep the pixel sizes of the level above; halve the window when fewer than 2
  windows fit and the patch when fewer than 2 patches fit a window;
* ``mixed`` (default): even levels keep the window count (level 2k uses num_wind // 2**k windows,
  at least 2), odd levels keep the window size of the level above.
"""

from __future__ import annotations

import dataclasses

ATT_LETTERS = {"L": "local", "G": "global", "T": "temporal", "V": "vit"}
WINDOW_SIZING_METHODS = ("mixed", "keep_window_size", "keep_num_window")


def parse_block_string(block_str: str) -> list[tuple[str, bool]]:
    """``"L1G1T1"`` -> ``[("local", True), ("global", True), ("temporal", True)]``.

    Raises ValueError naming the offending position for anything that is not pairs of
    (letter in L/G/T/V, digit in 0/1).
    """
    if not isinstance(block_str, str) or len(block_str) == 0:
        raise ValueError(f"block string must be a non-empty string such as 'L1G1T1', got {block_str!r}")
    if len(block_str) % 2 != 0:
        raise ValueError(
            f"block string {block_str!r} has odd length {len(block_str)}; it must be pairs of an attention "
            f"letter ({'/'.join(ATT_LETTERS)}) and a mixer digit (0/1)"
        )
    cells = []
    for i in range(0, len(block_str), 2):
        letter, digit = block_str[i], block_str[i + 1]
        if letter.upper() not in ATT_LETTERS:
            raise ValueError(
                f"block string {block_str!r}: position {i} is {letter!r}, expected an attention letter "
                f"in {'/'.join(ATT_LETTERS)}"
            )
        if digit not in "01":
            raise ValueError(
                f"block string {block_str!r}: position {i + 1} is {digit!r}, expected a mixer digit 0 or 1"
            )
        cells.append((ATT_LETTERS[letter.upper()], digit == "1"))
    return cells


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """Window and patch sizes (pixels) of one resolution level at its build-time size H x W."""

    H: int
    W: int
    window: tuple[int, int]
    patch: tuple[int, int]

    @property
    def num_wind(self) -> tuple[int, int]:
        return (max(self.H // self.window[0], 1), max(self.W // self.window[1], 1))

    @property
    def num_patch(self) -> tuple[int, int]:
        return (max(self.window[0] // self.patch[0], 1), max(self.window[1] // self.patch[1], 1))


def keep_num_window(HW: tuple[int, int], num_wind: tuple[int, int], num_patch: tuple[int, int]) -> WindowSpec:
    nw = [max(v, 2) for v in num_wind]
    npch = [max(v, 2) for v in num_patch]
    window = tuple(max(s // n, 1) for s, n in zip(HW, nw, strict=True))
    patch = tuple(max(w // n, 1) for w, n in zip(window, npch, strict=True))
    return WindowSpec(HW[0], HW[1], window, patch)  # type: ignore[arg-type]


def keep_window_size(HW: tuple[int, int], window: tuple[int, int], patch: tuple[int, int]) -> WindowSpec:
    win = list(window)
    pat = list(patch)
    for a in range(2):
        if HW[a] // win[a] < 2:
            win[a] = max(HW[a] // 2, 1)
        if win[a] // pat[a] < 2:
            pat[a] = max(win[a] // 2, 1)
    return WindowSpec(HW[0], HW[1], (win[0], win[1]), (pat[0], pat[1]))


def level_windows(
    H: int,
    W: int,
    window: tuple[int, int],
    patch: tuple[int, int],
    num_levels: int,
    method: str = "mixed",
) -> list[WindowSpec]:
    """Window specs of levels 0 .. num_levels-1, level l at (H // 2**l, W // 2**l).

    ``window`` and ``patch`` are the level-0 sizes in pixels at the build-time size H x W; they define
    the level-0 window count H // window and patches per window window // patch.
    """
    if method not in WINDOW_SIZING_METHODS:
        raise ValueError(f"window_sizing_method must be one of {WINDOW_SIZING_METHODS}, got {method!r}")
    for name, v in (("window", window), ("patch", patch)):
        if len(v) != 2 or min(v) < 1:
            raise ValueError(f"{name} must be two positive sizes (h, w), got {v}")
    num_wind = (max(H // window[0], 1), max(W // window[1], 1))
    num_patch = (max(window[0] // patch[0], 1), max(window[1] // patch[1], 1))
    specs: list[WindowSpec] = []
    for lev in range(num_levels):
        HW = (H // 2**lev, W // 2**lev)
        if min(HW) < 1:
            raise ValueError(f"level {lev}: image {H}x{W} is too small for {num_levels} levels")
        if lev == 0:
            # level 0 takes the given sizes (up to the at-least-two-windows rule)
            spec = (
                keep_window_size(HW, window, patch)
                if method == "keep_window_size"
                else keep_num_window(HW, num_wind, num_patch)
            )
        elif method == "keep_num_window":
            spec = keep_num_window(HW, num_wind, num_patch)
        elif method == "keep_window_size" or lev % 2 == 1:
            spec = keep_window_size(HW, specs[-1].window, specs[-1].patch)
        else:
            k = 2 ** (lev // 2)
            spec = keep_num_window(HW, (num_wind[0] // k, num_wind[1] // k), num_patch)
        specs.append(spec)
    return specs
