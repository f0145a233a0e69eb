"""Every public argument with a default, of every op (fm_engine.ops) and module / function (fm_engine.nn), set to a
non-default value in at least one test, at a value large enough that ignoring it fails the test.

``MANIFEST`` maps each callable to an entry per defaulted parameter; ``test_manifest_covers_every_argument``
lists the real signatures by introspection, so a new argument without an entry (or an entry for an argument that
no longer exists) fails. Kinds of entry:

* ``Case(value, against=...)``: run here by ``test_argument``. With the argument at ``value``, every fast backend
  matches the reference (ops) or the literal definition (modules without backends), forward and gradients; and
  the output at ``value`` differs from the output at ``against`` (the default unless given) by far more than the
  parity bound, so a backend or module that ignored the argument (computed as if at ``against``) would fail.
* ``Backend(value)``: the named backend is the one that runs (``ops.trace``), and matches the reference.
* ``Forwarded(op, name)``: a module's dropout: the module hands ``value`` to its op in training and 0 in eval
  (the op's dropout has its own parity tests, named by ``Elsewhere`` entries of the op).
* ``Inert(value, why)``: documented as without effect for this class: the output is identical.
* ``Raises(value, match, why)``: a value the callable refuses (ValueError matching ``match``); ``why`` says why.
* ``Elsewhere(test, pattern)``: set by another test, named ``file::function``; the function must exist and its
  source must match ``pattern`` (where it sets the argument), checked by ``test_elsewhere_entries_point_at_tests``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import literal as L
import pytest
import torch
from torch import nn

import fm_engine
import fm_engine.nn as fnn
from fm_engine import ops
from fm_engine.ops import _record

TESTS = Path(__file__).resolve().parent
_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Case:
    value: Any
    against: Any = _DEFAULT  # the base configuration's value, else the signature's default
    also: tuple = ()  # (name, value) pairs set in both runs
    against_also: tuple = ()  # (name, value) pairs set in the ``against`` run only


@dataclasses.dataclass(frozen=True)
class Backend:
    value: str = "triton"


@dataclasses.dataclass(frozen=True)
class Forwarded:
    value: float
    op: str
    name: str


@dataclasses.dataclass(frozen=True)
class Inert:
    value: Any
    why: str


@dataclasses.dataclass(frozen=True)
class Raises:
    value: Any
    match: str
    why: str


@dataclasses.dataclass(frozen=True)
class Elsewhere:
    test: str
    pattern: str


# --- what each callable is run with ---------------------------------------------------------------------------
# Sentinels (strings in capitals) stand for tensors the builders make: MASK a key-padding mask, BIAS a
# relative-position bias, KV a second token set, X16x8-style input sizes via "x_hw".

SPATIAL_BASE = dict(C_in=2, C_out=4, H=8, W=8, num_wind=2, num_patch=2, n_head=2)
SPATIAL = {
    "C_out": Case(8),
    "H": Case(16, against=8, also=(("x_hw", (16, 8)), ("att_with_relative_position_bias", False))),
    "W": Case(16, against=8, also=(("x_hw", (8, 16)), ("att_with_relative_position_bias", False))),
    "window_size": Case((4, 2)),
    "patch_size": Case((1, 2)),
    "num_wind": Case((1, 2), against=2),
    "num_patch": Case((1, 2), against=2),
    "a_type": Case("lin"),
    "n_head": Case(4, against=2),
    "kernel_size": Case(5, also=(("padding", 2),), against=3, against_also=(("padding", 1),)),
    "stride": Case(2, also=(("stride_qk", 2),)),
    "padding": Case(2, also=(("kernel_size", 5),), against=1, against_also=(("kernel_size", 3),)),
    "stride_qk": Case(2),
    "att_dropout_p": Forwarded(0.3, "window_attention", "dropout_p"),
    "cosine_att": Case(True),
    "normalize_Q_K": Case(True),
    "att_with_relative_position_bias": Case(False),
    "att_with_output_proj": Case(False),
    "backend": Backend(),
}
VIT_IGNORES = "SpatialViTAttention: the patch is the window (documented), patch_size / num_patch are ignored"

# nn.EncoderLayer and nn.LayerScale build other modules (no backend of their own): one test sets their arguments
ENCODER_TEST = "test_arguments.py::test_encoder_layer_and_layer_scale_arguments"

MANIFEST: dict[str, dict[str, Any]] = {
    "ops.relu2": {"backend": Backend()},
    "ops.relu2_mlp": {
        "dropout_p": Elsewhere(
            "test_relu2.py::test_relu2_mlp_dropout_matches_mask", r"p = 0\.3\n[\s\S]*with_seed\(x, w1, w2, p, backend\)"
        ),
        "backend": Backend("hybrid"),
    },
    "ops.patch_embed": {
        "pool_to": Case((2, 3)),
        "intensity_scale": Case(0.002, against=1 / 255),
        "intensity_offset": Case(-0.7),
        "out_dtype": Case(torch.bfloat16),
        "eps": Case(0.5),
        "backend": Backend(),
    },
    "ops.cross_attention": {
        "scale": Case(0.9),
        "dropout_p": Elsewhere("test_cross_attention.py::test_dropout_parity", r"dropout_p=p\b"),
        "key_padding_mask": Case("MASK"),
        "backend": Backend(),
    },
    "ops.temporal_attention": {
        "scale": Case(1.5),
        "cosine": Case(True),
        "normalize_qk": Case(True),
        "causal": Case(True),
        "dropout_p": Elsewhere("test_temporal_attention.py::test_triton_dropout_parity", r"dropout_p=dropout_p"),
        "backend": Backend(),
    },
    "ops.window_attention": {
        "mode": Case("global", also=(("num_windows", (2, 1)),)),
        "num_patches": Case((2, 1), against=2),
        "num_windows": Case((2, 1), against=(1, 2), also=(("mode", "global"),)),
        "scale": Case(2.0),
        "cosine": Case(True),
        "normalize_qk": Case(True),
        "rel_pos_bias": Case("BIAS"),
        "dropout_p": Elsewhere("test_window_attention.py::test_triton_dropout_parity", r"dropout_p=dropout_p"),
        "backend": Backend(),
    },
    "nn.ReLU2": {"backend": Backend()},
    "nn.ReLU2MLP": {"dropout": Forwarded(0.3, "relu2_mlp", "dropout_p"), "backend": Backend()},
    "nn.Attention": {
        "kv_heads": Case(2),
        "kv_dim": Case(24, also=(("kv", "KV24"),), against=16, against_also=(("kv", "KV16"),)),
        "head_dim": Case(32, against=16),
        "dropout": Forwarded(0.3, "cross_attention", "dropout_p"),
        "bias": Case(True),
        "backend": Backend(),
    },
    "nn.Attention.forward": {
        "kv": Case("KV24", also=(("kv_dim", 24),), against_also=(("kv_dim", None),)),
        "key_padding_mask": Case("MASK"),
    },
    "nn.Conv2DExt": {
        "kernel_size": Case(5),
        "stride": Case(2),
        "padding": Case(0),
        "bias": Case(False),
        "separable": Case(True),
    },
    "nn.Conv3DExt": {
        "kernel_size": Case(1, also=(("padding", 0),)),
        "stride": Case(2),
        "padding": Case(0),
        "bias": Case(False),
    },
    "nn.LoRALinear": {"rank": Case(2), "alpha": Case(3.0)},
    "nn.PatchEmbed2d": {"pool_to": Case((2, 3)), "backend": Backend()},
    "nn.PatchEmbed2d.forward": {
        "intensity_scale": Case(0.002, against=1 / 255),
        "intensity_offset": Case(-0.7),
        "out_dtype": Case(torch.bfloat16),
    },
    "nn.AdaptiveStem2d": {"backend": Backend()},
    "nn.AdaptiveStem2d.forward": {
        "intensity_scale": Case(0.002, against=1 / 255),
        "intensity_offset": Case(-0.7),
        "out_dtype": Case(torch.bfloat16),
    },
    "nn.SpatialLocalAttention": SPATIAL,
    "nn.SpatialGlobalAttention": SPATIAL,
    "nn.SpatialViTAttention": {
        **SPATIAL,
        "patch_size": Inert((1, 2), VIT_IGNORES),
        "num_patch": Inert((1, 2), VIT_IGNORES),
        # the window count is taken from the input's size, so a V strided by its conv never fits: refused
        "stride": Raises(2, "is not divisible into", "SpatialViTAttention counts windows on the input, not on V"),
    },
    "nn.TemporalAttention": {
        "C_out": Case(8),
        "a_type": Case("lin"),
        "n_head": Case(4, against=2),
        "kernel_size": Case(5, also=(("padding", 2),), against=3, against_also=(("padding", 1),)),
        "stride": Case(2, also=(("stride_qk", 2),)),
        "padding": Case(2, also=(("kernel_size", 5),), against=1, against_also=(("kernel_size", 3),)),
        "stride_qk": Case(1),
        "att_dropout_p": Forwarded(0.3, "temporal_attention", "dropout_p"),
        "cosine_att": Case(True),
        "normalize_Q_K": Case(True),
        "is_causal": Case(True),
        "att_with_output_proj": Case(False),
        "backend": Backend(),
    },
    "nn.EncoderLayer": {
        "kv_heads": Elsewhere(ENCODER_TEST, r"kv_heads=2"),
        "head_dim": Elsewhere(ENCODER_TEST, r"head_dim=8"),
        "mlp_ratio": Elsewhere(ENCODER_TEST, r"mlp_ratio=2"),
        "dropout": Elsewhere(ENCODER_TEST, r"dropout=0\.3"),
        "attn_dropout": Elsewhere(ENCODER_TEST, r"attn_dropout=0\.2"),
        "layer_scale": Elsewhere(ENCODER_TEST, r"layer_scale=0\.0"),
    },
    "nn.EncoderLayer.forward": {"key_padding_mask": Elsewhere(ENCODER_TEST, r"key_padding_mask=mask")},
    "nn.LayerScale": {"init": Elsewhere(ENCODER_TEST, r"init=0\.5")},
    "nn.apply_lora": {
        "targets": Elsewhere("test_lora.py::test_freeze_options_and_targets", r"apply_lora\(model, targets=\("),
        "rank": Elsewhere("test_lora.py::test_apply_freeze_train_merge", r"apply_lora\(model, rank=4"),
        "alpha": Elsewhere("test_lora.py::test_apply_freeze_train_merge", r"alpha=8\.0"),
    },
    "nn.freeze_except_lora": {
        "unfreeze_norms": Elsewhere("test_lora.py::test_freeze_options_and_targets", r"unfreeze_norms=True"),
        "unfreeze_stem": Elsewhere("test_lora.py::test_freeze_options_and_targets", r"unfreeze_stem=True"),
    },
}


# --- the public signatures ----------------------------------------------------------------------------------


def public_callables() -> dict[str, Any]:
    """Every op function of fm_engine.ops, every module (constructor and forward) and function of fm_engine.nn."""
    out: dict[str, Any] = {}
    for name in ops.__all__:
        obj = getattr(ops, name)
        if callable(obj) and hasattr(obj, "op_name"):
            out[f"ops.{name}"] = obj
    for name in fnn.__all__:
        obj = getattr(fnn, name)
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            out[f"nn.{name}"] = obj.__init__
            out[f"nn.{name}.forward"] = obj.forward
        elif callable(obj):
            out[f"nn.{name}"] = obj
    return out


def defaulted(fn: Any) -> dict[str, Any]:
    """Parameters with a default value -> the default."""
    sig = inspect.signature(fn)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def test_manifest_covers_every_argument() -> None:
    found = public_callables()
    assert {"ops.relu2_mlp", "ops.window_attention", "nn.SpatialLocalAttention", "nn.PatchEmbed2d.forward"} <= set(
        found
    )
    missing, stale, default_valued = [], [], []
    for cid, fn in found.items():
        params = defaulted(fn)
        entries = MANIFEST.get(cid, {})
        missing += [f"{cid}({n}=...)" for n in params if n not in entries]
        stale += [f"{cid}({n})" for n in entries if n not in params]
        for n, e in entries.items():
            value = getattr(e, "value", None)
            if n in params and not isinstance(e, Elsewhere) and _same(value, params[n]):
                default_valued.append(f"{cid}({n}={value!r}) is its default")
    stale += [f"{cid} (no such public callable)" for cid in MANIFEST if cid not in found]
    assert not missing, f"public arguments that no test sets to a non-default value (add MANIFEST entries): {missing}"
    assert not stale, f"MANIFEST entries for arguments that do not exist: {stale}"
    assert not default_valued, default_valued


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def test_elsewhere_entries_point_at_tests() -> None:
    for cid, entries in MANIFEST.items():
        for arg, e in entries.items():
            if not isinstance(e, Elsewhere):
                continue
            file, func = e.test.split("::")
            src = (TESTS / file).read_text()
            node = next(
                (n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == func), None
            )
            assert node is not None, f"{cid}({arg}): {e.test} does not exist"
            body = ast.get_source_segment(src, node) or ""
            decorators = "".join(ast.get_source_segment(src, d) or "" for d in node.decorator_list)
            assert re.search(e.pattern, decorators + body), f"{cid}({arg}): {e.test} does not match {e.pattern!r}"
            assert "pytest.mark.skip(" not in decorators, f"{cid}({arg}): {e.test} is always skipped"


# --- builders: one call of each callable, seeded, with overrides -------------------------------------------------


def _tensor_for(sentinel: Any, device, **shape) -> Any:
    if not isinstance(sentinel, str) or not sentinel.isupper():
        return sentinel
    g = torch.Generator().manual_seed(11)
    if sentinel == "MASK":
        m = torch.rand(shape["B"], shape["Nk"], generator=g) < 0.5
        m[:, 0] = False  # keep one key per row
        m[0, 1:] = True  # row 0: one key only
        return m.to(device)
    if sentinel == "BIAS":
        return (torch.randn(shape["heads"], shape["N"], shape["N"], generator=g) * 0.5).to(device)
    if sentinel.startswith("KV"):
        return torch.randn(shape["B"], 7, int(sentinel[2:]), generator=g).to(device)
    raise AssertionError(sentinel)


def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in ts]


def _op_call(cid: str, kw: dict, backend: str | None, device) -> tuple[Any, list[torch.Tensor]]:
    """(output, leaves) of one seeded call of an op with the overrides ``kw``."""
    g = torch.Generator().manual_seed(5)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    if cid == "ops.relu2":
        (x,) = _leaves(r(64))
        return ops.relu2(x, **kw, backend=backend), [x]
    if cid == "ops.relu2_mlp":
        x, w1, w2 = _leaves(r(8, 16), r(32, 16) / 4, r(16, 32) / 6)
        return ops.relu2_mlp(x, w1, w2, **kw, backend=backend), [x, w1, w2]
    if cid == "ops.patch_embed":
        image = (torch.rand(1, 1, 16, 24, generator=g) * 255).to(torch.uint8).to(device)
        params = _leaves(r(8, 1, 4, 4), r(8), 1 + r(8) / 4, r(8) / 4, r(8, 2), r(8))
        kw = {"intensity_scale": 1 / 255, **kw}
        return ops.patch_embed(image, *params, patch=4, **kw, backend=backend), params
    if cid == "ops.cross_attention":
        q, k, v = _leaves(r(2, 4, 5, 16), r(2, 2, 7, 16), r(2, 2, 7, 16))
        kw = {k_: _tensor_for(v_, device, B=2, Nk=7) for k_, v_ in kw.items()}
        return ops.cross_attention(q, k, v, kv_heads=2, **kw, backend=backend), [q, k, v]
    if cid == "ops.temporal_attention":
        q, k, v = _leaves(r(2, 3, 4, 2, 2), r(2, 3, 4, 2, 2), r(2, 3, 4, 4, 4))
        return ops.temporal_attention(q, k, v, n_head=2, **kw, backend=backend), [q, k, v]
    if cid == "ops.window_attention":
        q, k, v = _leaves(r(1, 1, 2, 8, 8), r(1, 1, 2, 8, 8), r(1, 1, 2, 8, 8))
        kw = {"mode": "local", "num_patches": 2, **kw}
        n = 4 if kw["mode"] == "local" else 2  # tokens per group in the shapes used here
        if kw["mode"] == "local" and kw["num_patches"] != 2:
            n = 2
        kw = {k_: _tensor_for(v_, device, heads=2, N=n) for k_, v_ in kw.items()}
        out = ops.window_attention(q, k, v, patch_size=2, n_head=2, **kw, backend=backend)
        return out, [q, k, v, *([kw["rel_pos_bias"].requires_grad_()] if "rel_pos_bias" in kw else [])]
    raise AssertionError(cid)


def _module(cid: str, ctor: dict, device) -> nn.Module:
    name = cid.split(".")[1]
    cls = getattr(fnn, name)
    torch.manual_seed(3)
    if name == "ReLU2":
        m = cls(**ctor)
    elif name == "ReLU2MLP":
        m = cls(16, 32, **ctor)
    elif name == "Attention":
        m = cls(16, 4, **{"head_dim": 16, **ctor})
    elif name == "Conv2DExt":
        m = cls(2, 3, **ctor)
    elif name == "Conv3DExt":
        m = cls(2, 3, **ctor)
    elif name == "LoRALinear":
        m = cls(nn.Linear(6, 5), **ctor)
        nn.init.normal_(m.lora_B)  # a fresh adapter is zero: make its scaling visible
    elif name == "PatchEmbed2d":
        m = cls(1, 8, 4, **ctor)
    elif name == "AdaptiveStem2d":
        m = cls(1, 8, 8, 4, (2, 3), **ctor)
    elif name == "TemporalAttention":
        m = cls(**{"C_in": 2, "C_out": 4, "n_head": 2, **ctor})
    else:
        m = cls(**{**SPATIAL_BASE, **ctor})
        if getattr(m, "relative_position_bias_table", None) is not None:
            nn.init.normal_(m.relative_position_bias_table, std=0.5)  # large enough to matter
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(torch.randn_like(mod.weight) / 4)
                mod.bias.add_(torch.randn_like(mod.bias) / 4)
    return m.to(device)


def _module_call(cid: str, kw: dict, backend: str | None, device) -> tuple[Any, list[torch.Tensor]]:
    """(output, leaves) of one seeded module forward; ``kw`` holds constructor and forward overrides."""
    name = cid.split(".")[1]
    cls = getattr(fnn, name)
    init_names = set(defaulted(cls.__init__)) | set(inspect.signature(cls.__init__).parameters)
    fwd_names = set(inspect.signature(cls.forward).parameters) - {"self"}
    ctor = {k: v for k, v in kw.items() if k in init_names}
    if "backend" in init_names:
        ctor.setdefault("backend", backend)  # the constructor's argument, as a user passes it
    fwd = {k: v for k, v in kw.items() if k in fwd_names and k not in init_names}
    x_hw = kw.get("x_hw")
    m = _module(cid, ctor, device)
    g = torch.Generator().manual_seed(9)
    if name in ("ReLU2",):
        x = torch.randn(64, generator=g)
    elif name in ("ReLU2MLP",):
        x = torch.randn(8, 16, generator=g)
    elif name == "Attention":
        x = torch.randn(2, 5, 16, generator=g)
        nk = 7 if fwd.get("kv") is not None else 5
        fwd = {k: _tensor_for(v, device, B=2, Nk=nk) for k, v in fwd.items()}
    elif name == "LoRALinear":
        x = torch.randn(4, 6, generator=g)
    elif name in ("PatchEmbed2d", "AdaptiveStem2d"):
        x = (torch.rand(1, 1, 16, 24, generator=g) * 255).to(torch.uint8)
        fwd = {"intensity_scale": 1 / 255, **fwd}
    else:
        x = torch.randn(1, 1 if name.startswith("Spatial") else 3, 2, *(x_hw or (8, 8)), generator=g)
    x = x.to(device)
    if x.is_floating_point():
        x.requires_grad_()
    out = m(x, **fwd)
    leaves = [p for p in m.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
    leaves += [t.requires_grad_() for t in fwd.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return out, leaves


def _literal_module(cid: str, kw: dict, device) -> torch.Tensor:
    """Modules without fast backends, computed from their parameters by their documented definitions."""
    name = cid.split(".")[1]
    init = inspect.signature(getattr(fnn, name).__init__).parameters
    m = _module(cid, {k: v for k, v in kw.items() if k in init}, device)
    g = torch.Generator().manual_seed(9)
    if name == "LoRALinear":
        x = torch.randn(4, 6, generator=g).to(device)
        rank, alpha = m.lora_A.shape[0], kw.get("alpha", 16.0)
        return x @ m.base.weight.T + m.base.bias + (alpha / rank) * (x @ m.lora_A.T) @ m.lora_B.T
    x = torch.randn(1, 3, 2, 8, 8, generator=g).to(device)
    convs = [c for c in m.modules() if isinstance(c, (nn.Conv2d, nn.Conv3d))]
    # documented: ``bias`` puts a bias on every convolution (both, when separable), or on none
    assert all((c.bias is not None) == kw.get("bias", True) for c in convs), convs
    if name == "Conv2DExt":
        frames = []
        for t in range(x.shape[1]):
            f = x[:, t]
            if m.separable:
                dw, pw = m.depthwise, m.pointwise
                f = torch.nn.functional.conv2d(f, dw.weight, dw.bias, dw.stride, dw.padding, groups=f.shape[1])
                f = torch.nn.functional.conv2d(f, pw.weight, pw.bias)
            else:
                c = m.conv2d
                f = torch.nn.functional.conv2d(f, c.weight, c.bias, c.stride, c.padding)
            frames.append(f)
        return torch.stack(frames, dim=1)
    if name in ("PatchEmbed2d", "AdaptiveStem2d"):
        g = torch.Generator().manual_seed(9)  # the image of _module_call
        image = (torch.rand(1, 1, 16, 24, generator=g) * 255).to(torch.uint8)
        fwd = {k: kw[k] for k in ("intensity_scale", "intensity_offset") if k in kw}
        fwd = {"intensity_scale": 1 / 255, **fwd}

        def path(proj, norm, pos, pool_to):
            params = [t.detach().double().cpu() for t in (proj.weight, proj.bias, norm.weight, norm.bias)]
            params += [pos.weight.detach().double().cpu(), pos.bias.detach().double().cpu()]
            return L.patch_embed(image, *params, patch=4, pool_to=pool_to, eps=norm.eps, **fwd).reshape(-1)

        out = [path(m.proj, m.norm, m.pos, m.pool_to)]
        if name == "AdaptiveStem2d":
            out.append(path(m.kv_proj, m.kv_norm, m.kv_pos, None))
        return torch.cat(out).to(device)
    c = m.conv3d  # Conv3DExt: a 3-D conv over (T, H, W), channels at dim 2
    return torch.nn.functional.conv3d(x.transpose(1, 2), c.weight, c.bias, c.stride, c.padding).transpose(1, 2)


TOL = 2e-4  # fp32 parity bound (bf16 outputs: see _bound)
MATTERS = 50  # a value "matters" when it moves the output by this many times the bound


def _bound(kw: dict) -> float:
    return 2e-2 if kw.get("out_dtype") == torch.bfloat16 else TOL


# Parity runs of the fast backend. The Triton interpreter costs seconds per kernel launch whatever the size, so
# the non-default values are combined: each combination is one fast-backend run against the reference (forward
# and every gradient), with the fast backend chosen through the callable's own ``backend`` argument; then, on the
# reference alone, each argument named in ``checks`` is put back to its ``against`` value with the others kept,
# and the output must move by more than MATTERS x the bound (so a fast path that ignored it would fail parity).
COMBOS: dict[str, list[tuple[str, dict, tuple[str, ...]]]] = {
    "ops.relu2": [("triton", {}, ())],
    "ops.relu2_mlp": [("hybrid", {}, ())],
    "ops.patch_embed": [
        ("triton", {"pool_to": (2, 3), "intensity_scale": 0.002, "intensity_offset": -0.7, "eps": 0.5},
         ("pool_to", "intensity_scale", "intensity_offset", "eps")),
        ("triton", {"out_dtype": torch.bfloat16}, ("out_dtype",)),
    ],
    "ops.cross_attention": [("triton", {"scale": 0.9, "key_padding_mask": "MASK"}, ("scale", "key_padding_mask"))],
    "ops.temporal_attention": [
        ("triton", {"scale": 1.5, "normalize_qk": True, "causal": True}, ("scale", "normalize_qk", "causal")),
        ("triton", {"cosine": True}, ("cosine",)),
    ],
    "ops.window_attention": [
        ("triton",
         {"mode": "global", "num_windows": (2, 1), "scale": 2.0, "normalize_qk": True, "rel_pos_bias": "BIAS"},
         ("mode", "num_windows", "scale", "normalize_qk", "rel_pos_bias")),
        ("triton", {"num_patches": (2, 1), "cosine": True}, ("num_patches", "cosine")),
    ],
    "nn.ReLU2": [("triton", {}, ())],
    "nn.ReLU2MLP": [("triton", {}, ())],
    "nn.Attention": [
        ("triton", {"kv_heads": 2, "head_dim": 32, "bias": True, "key_padding_mask": "MASK"},
         ("kv_heads", "head_dim", "bias", "key_padding_mask")),
        ("triton", {"kv_dim": 24, "kv": "KV24"}, ("kv_dim", "kv")),
    ],
    "nn.PatchEmbed2d": [
        ("triton", {"pool_to": (2, 3), "intensity_scale": 0.002, "intensity_offset": -0.7},
         ("pool_to", "intensity_scale", "intensity_offset")),
        ("triton", {"out_dtype": torch.bfloat16}, ("out_dtype",)),
    ],
    "nn.AdaptiveStem2d": [
        ("triton", {"intensity_scale": 0.002, "intensity_offset": -0.7}, ("intensity_scale", "intensity_offset")),
        ("triton", {"out_dtype": torch.bfloat16}, ("out_dtype",)),
    ],
    "nn.TemporalAttention": [
        ("triton", {"C_out": 8, "n_head": 4, "kernel_size": 5, "padding": 2, "stride": 2, "stride_qk": 1,
                    "cosine_att": True, "att_with_output_proj": False},
         ("C_out", "n_head", "kernel_size", "padding", "stride", "stride_qk", "cosine_att", "att_with_output_proj")),
        ("triton", {"a_type": "lin", "normalize_Q_K": True, "is_causal": True},
         ("a_type", "normalize_Q_K", "is_causal")),
    ],
}  # fmt: skip
_SPATIAL_COMBOS = [
    ("triton", {"C_out": 8, "n_head": 4, "kernel_size": 5, "padding": 2, "stride_qk": 2, "cosine_att": True,
                "att_with_output_proj": False, "num_wind": (1, 2), "H": 16, "W": 16, "x_hw": (16, 16),
                "att_with_relative_position_bias": False},
     ("C_out", "n_head", "kernel_size", "padding", "stride_qk", "cosine_att", "att_with_output_proj", "num_wind",
      "H", "W")),
    ("triton", {"a_type": "lin", "normalize_Q_K": True, "window_size": (4, 2), "num_patch": (1, 2),
                "att_with_relative_position_bias": False},
     ("a_type", "normalize_Q_K", "window_size", "num_patch", "att_with_relative_position_bias")),
    ("triton", {"stride": 2, "stride_qk": 2, "patch_size": (2, 4), "x_hw": (16, 16),
                "att_with_relative_position_bias": False},
     ("stride", "patch_size")),
]  # fmt: skip
for _name in ("SpatialLocalAttention", "SpatialGlobalAttention"):
    COMBOS[f"nn.{_name}"] = _SPATIAL_COMBOS
# ViT: patch_size / num_patch are documented no-ops and a strided V is refused (see MANIFEST)
COMBOS["nn.SpatialViTAttention"] = [
    (b, kw, tuple(a for a in checks if a not in ("num_patch", "patch_size"))) for b, kw, checks in _SPATIAL_COMBOS[:2]
]


def _entry(cid: str, arg: str) -> Any:
    return MANIFEST.get(cid, {}).get(arg, MANIFEST.get(f"{cid}.forward", {}).get(arg))


def _run(cid: str, kw: dict, backend: str | None, device) -> tuple[torch.Tensor, list[torch.Tensor], torch.dtype]:
    """Output (flattened, float64), the gradients of every leaf for one fixed output gradient, the output dtype."""
    out, leaves = (_op_call if cid.startswith("ops.") else _module_call)(cid, kw, backend, device)
    outs = out if isinstance(out, tuple) else (out,)
    flat = torch.cat([o.reshape(-1) for o in outs])
    dy = torch.randn(flat.shape, generator=torch.Generator().manual_seed(13)).to(flat)
    grads = torch.autograd.grad(flat, leaves, dy, allow_unused=True) if leaves else ()
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads, strict=True)]
    return flat.detach().double(), [gr.double() for gr in grads], flat.dtype


def _reverted(cid: str, kw: dict, arg: str) -> dict:
    """``kw`` with ``arg`` at its ``against`` value (and that entry's ``against_also`` settings)."""
    e = _entry(cid, arg)
    against = e.against if e.against is not _DEFAULT else _base_value(cid, arg)
    if against is _DEFAULT:
        params = defaulted(public_callables()[cid])
        against = params[arg] if arg in params else defaulted(public_callables()[f"{cid}.forward"])[arg]
    out = {**kw, **dict(e.against_also)}
    if against is None:
        out.pop(arg)
    else:
        out[arg] = against
    return out


def _base_value(cid: str, arg: str) -> Any:
    if cid.startswith("nn.Spatial") and arg in SPATIAL_BASE:
        return SPATIAL_BASE[arg]
    return _DEFAULT


COMBO_IDS = [(cid, i) for cid, combos in COMBOS.items() for i in range(len(combos))]


@pytest.mark.parametrize(("cid", "index"), COMBO_IDS, ids=[f"{c}-{i}" for c, i in COMBO_IDS])
def test_non_default_arguments_parity(cid: str, index: int, device, no_tf32) -> None:
    backend, kw, checks = COMBOS[cid][index]
    bound = _bound(kw)
    with ops.trace() as calls:
        ref, ref_g, ref_dtype = _run(cid, kw, "reference", device)
    assert calls and {c[1] for c in calls} == {"reference"}, calls
    with ops.trace() as calls:
        fast, fast_g, fast_dtype = _run(cid, kw, backend, device)
    assert calls and {c[1] for c in calls} == {backend}, f"the backend argument {backend!r} did not run: {calls}"
    assert fast_dtype == ref_dtype
    torch.testing.assert_close(fast, ref, rtol=bound, atol=bound, msg=lambda m: f"{cid} {kw}: {m}")
    for i, (a, r) in enumerate(zip(fast_g, ref_g, strict=True)):
        torch.testing.assert_close(a, r, rtol=bound, atol=bound, msg=lambda m, i=i: f"{cid} {kw} grad {i}: {m}")
    if cid in LITERAL_MODULES and "out_dtype" not in kw:  # the module itself against its documented definition
        lit = _literal_module(cid, kw, device).double()
        torch.testing.assert_close(ref, lit, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cid} {kw} vs literal: {m}")
    for arg in checks:
        other, _, other_dtype = _run(cid, _reverted(cid, kw, arg), "reference", device)
        if isinstance(kw[arg], torch.dtype):  # an output dtype: the dtype is what moves
            assert ref_dtype == kw[arg] != other_dtype, (cid, arg, ref_dtype, other_dtype)
            continue
        if other.shape == ref.shape:
            moved = (ref - other).abs().max().item()
            assert moved > MATTERS * bound, f"{cid}({arg}={kw[arg]!r}) moves the output by {moved:.3g} only"


def test_every_case_is_checked_in_a_parity_run() -> None:
    unchecked = []
    for cid, entries in MANIFEST.items():
        base = cid.removesuffix(".forward")
        for arg, e in entries.items():
            if base in NO_BACKEND or isinstance(e, (Elsewhere, Forwarded, Inert, Raises)):
                continue
            combos = COMBOS.get(base, [])
            if isinstance(e, Backend):
                ok = any(b == e.value for b, _, _ in combos)
            else:
                ok = any(arg in checks and not _same(kw[arg], defaulted(public_callables()[cid])[arg])
                         for _, kw, checks in combos)  # fmt: skip
            if not ok:
                unchecked.append(f"{cid}({arg})")
    assert not unchecked, f"MANIFEST entries that no parity combination checks: {unchecked}"


NO_BACKEND = ("nn.Conv2DExt", "nn.Conv3DExt", "nn.LoRALinear")
LITERAL_MODULES = ("nn.PatchEmbed2d", "nn.AdaptiveStem2d")  # modules with a fast backend also checked literally
SINGLE = [
    (cid, arg)
    for cid, entries in MANIFEST.items()
    for arg, e in entries.items()
    if isinstance(e, (Forwarded, Inert, Raises)) or (cid in NO_BACKEND and isinstance(e, Case))
]


@pytest.mark.parametrize(("cid", "arg"), SINGLE, ids=[f"{c}-{a}" for c, a in SINGLE])
def test_argument(cid: str, arg: str, device, no_tf32) -> None:
    """Module arguments without a fast-backend parity run: dropout handed to the op, documented no-ops, and the
    modules without backends against their literal definitions."""
    e = MANIFEST[cid][arg]
    if isinstance(e, Forwarded):
        _check_forwarded(cid, arg, e, device)
        return
    kw = {arg: e.value, **dict(getattr(e, "also", ()))}
    if isinstance(e, Raises):
        with pytest.raises(ValueError, match=e.match):
            _run(cid, kw, "reference", device)
        return
    ref, _, _ = _run(cid, kw, "reference", device)
    if isinstance(e, Inert):
        default = defaulted(public_callables()[cid])[arg]
        other, _, _ = _run(cid, {**kw, arg: SPATIAL_BASE.get(arg, default)}, "reference", device)
        torch.testing.assert_close(ref, other, rtol=0, atol=0)
        return
    lit = _literal_module(cid, kw, device).detach().double().reshape(-1)
    torch.testing.assert_close(ref, lit, rtol=1e-5, atol=1e-5)
    other, _, _ = _run(cid, _reverted(cid, kw, arg), "reference", device)
    if other.shape == ref.shape:
        moved = (ref - other).abs().max().item()
        assert moved > MATTERS * TOL, f"{cid}({arg}={e.value!r}) moves the output by {moved:.3g} only"


def _check_forwarded(cid: str, arg: str, e: Forwarded, device) -> None:
    m = _module(cid, {arg: e.value}, device)
    assert getattr(m, arg, getattr(m, "dropout", None)) == e.value
    x = {
        "nn.ReLU2MLP": lambda: torch.randn(8, 16),
        "nn.Attention": lambda: torch.randn(2, 5, 16),
        "nn.TemporalAttention": lambda: torch.randn(1, 3, 2, 8, 8),
    }.get(cid, lambda: torch.randn(1, 3, 2, 8, 8))().to(device)
    seen = {}
    for mode in ("train", "eval"):
        getattr(m, mode)()
        with _record.record() as rec:
            m(x)
        (call,) = [c for c in rec.calls if c.op == e.op]
        if e.name in call.kwargs:
            seen[mode] = call.kwargs[e.name]
        else:  # positional (relu2_mlp(x, w1, w2, dropout_p))
            seen[mode] = call.args[3]
    assert seen == {"train": e.value, "eval": 0.0}, seen


def test_stem_layernorm_eps_reaches_the_kernels(device, no_tf32) -> None:
    # the modules pass their LayerNorm's eps: a stem whose norms use another eps gives the same on every backend
    for cls, args in ((fnn.PatchEmbed2d, (1, 8, 4)), (fnn.AdaptiveStem2d, (1, 8, 8, 4, (2, 3)))):
        outs = {}
        for eps in (1e-5, 0.5):
            torch.manual_seed(3)
            m = cls(*args).to(device)
            for mod in m.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.eps = eps
            image = (torch.rand(1, 1, 16, 24, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
            for b in ("reference", "triton"):
                m.backend = b
                out = m(image.to(device), intensity_scale=1 / 255)
                outs[(eps, b)] = torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])
            torch.testing.assert_close(outs[(eps, "triton")], outs[(eps, "reference")], rtol=TOL, atol=TOL)
        assert (outs[(0.5, "reference")] - outs[(1e-5, "reference")]).abs().max() > MATTERS * TOL


def test_literal_patch_embed_agrees_at_the_non_default_stem_arguments(device) -> None:
    # the op's Case entries compare backends with each other; here the reference is pinned to the literal too at
    # the same non-default values (pool_to, intensity, eps together)
    g = torch.Generator().manual_seed(5)
    image = (torch.rand(1, 1, 16, 24, generator=g) * 255).to(torch.uint8)
    params = [torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64), *(torch.randn(8, generator=g,
              dtype=torch.float64) for _ in range(3)), torch.randn(8, 2, generator=g, dtype=torch.float64),
              torch.randn(8, generator=g, dtype=torch.float64)]  # fmt: skip
    kw = dict(patch=4, pool_to=(2, 3), intensity_scale=0.002, intensity_offset=-0.7, eps=0.5)
    got = ops.patch_embed(image, *params, **kw, backend="reference")
    torch.testing.assert_close(got, L.patch_embed(image, *params, **kw))


def test_encoder_layer_and_layer_scale_arguments(device) -> None:
    """``nn.EncoderLayer`` and ``nn.LayerScale`` only build other modules (no backend of their own): each argument
    shows where it acts, at a value whose omission (the default) would fail the check."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 16, generator=g).to(device)
    with fm_engine.use_backend("reference"):
        # kv_heads / head_dim / mlp_ratio size the projections they name (defaults: kv_heads = heads, 64, 4)
        m = fnn.EncoderLayer(16, 4, kv_heads=2, head_dim=8, mlp_ratio=2)
        assert (m.attn.kv_heads, m.attn.head_dim) == (2, 8)
        assert m.attn.k_proj.weight.shape == (2 * 8, 16) and m.attn.q_proj.weight.shape == (4 * 8, 16)
        assert m.mlp.fc1.weight.shape == (2 * 16, 16)
        # dropout / attn_dropout reach the ops in training, 0 in eval
        m = fnn.EncoderLayer(16, 4, head_dim=8, dropout=0.3, attn_dropout=0.2).to(device)
        for mode, want in (("train", (0.3, 0.2)), ("eval", (0.0, 0.0))):
            getattr(m, mode)()
            with _record.record() as rec:
                m(x)
            got = {c.op: c for c in rec.calls}
            assert (got["relu2_mlp"].args[3], got["cross_attention"].kwargs["dropout_p"]) == want, mode
        # layer_scale scales both branches: at 0 the layer is the identity (without it, it is not)
        m = fnn.EncoderLayer(16, 4, head_dim=8, layer_scale=0.0).to(device).eval()
        torch.testing.assert_close(m(x), x, rtol=0, atol=0)
        m = fnn.EncoderLayer(16, 4, head_dim=8, dropout=0.0, attn_dropout=0.0).to(device).eval()
        assert not torch.allclose(m(x), x)
        # key_padding_mask (forward): padded tokens are never attended to
        mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
        mask[0, 1:] = True
        out = m(x, key_padding_mask=mask)
        moved = x.clone()
        moved[0, 1:] += 5.0
        torch.testing.assert_close(m(moved, key_padding_mask=mask)[0, 0], out[0, 0])
        assert not torch.allclose(out[0, 0], m(x)[0, 0])
    # LayerScale(init): gamma starts at init (default 1e-5)
    ls = fnn.LayerScale(16, init=0.5).to(device)
    torch.testing.assert_close(ls(x), 0.5 * x, rtol=0, atol=0)
