"""Convolution in IEEE fp32 whatever the TF32 settings, as a custom op that ``torch.compile`` traces.

The full-precision stems (docs/KERNELS.md K5) must not let cuDNN round 16-bit pixel values to TF32's 10-bit
mantissa. ``torch.backends.cudnn.flags(allow_tf32=False)`` does that for a region, but dynamo cannot
enter that context manager: every frame above it broke the graph, so ``torch.compile`` of a whole
AViT M-JEPA step fell apart into dozens of graphs. As a custom op the flag lives inside an opaque call:
dynamo sees one op with a fake (meta) implementation, and the reference semantics are unchanged.

``conv_ieee(x, weight, bias, stride)``: ``F.conv2d`` / ``F.conv3d`` (by ``x.dim()``) with kernel =
``weight``, no padding, TF32 off for cuDNN; backward gives x, weight and bias gradients the same way.
"""

from __future__ import annotations

import contextlib

import torch


def _no_tf32() -> contextlib.AbstractContextManager:
    return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)  # type: ignore[return-value]


@torch.library.custom_op("fm_engine::conv_ieee", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int]) -> torch.Tensor:
    nd = x.dim() - 2
    with _no_tf32():
        return torch.ops.aten.convolution(x, weight, bias, stride, [0] * nd, [1] * nd, False, [0] * nd, 1)


@_conv.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int]) -> torch.Tensor:
    out = [(n - k) // s + 1 for n, k, s in zip(x.shape[2:], weight.shape[2:], stride, strict=True)]
    return x.new_empty((x.shape[0], weight.shape[0], *out))


@torch.library.custom_op("fm_engine::conv_ieee_backward", mutates_args=())
def _conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride: list[int], need_x: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nd = x.dim() - 2
    with _no_tf32():
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, [0] * nd, [1] * nd, False, [0] * nd, 1,
            [need_x, True, has_bias],
        )  # fmt: skip
    # custom ops return tensors: absent gradients come back empty and are dropped in _backward
    return (
        gx if gx is not None else x.new_empty(0),
        gw,
        gb if gb is not None else weight.new_empty(0),
    )


@_conv_backward.register_fake
def _(grad, x, weight, has_bias, stride, need_x):
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0),
    )


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.stride = bias is not None, stride


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, gw, gb = _conv_backward(grad.contiguous(), x, weight, ctx.has_bias, ctx.stride, need_x)
    return (gx if need_x else None), gw, (gb if ctx.has_bias else None), None


_conv.register_autograd(_backward, setup_context=_setup)


def conv_ieee(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """Strided convolution without padding (a patch embedding) in IEEE precision: x [B, C, *S] ->
    [B, D, *S/stride]; weight [D, C, *kernel]; bias [D] or None."""
    return _conv(x, weight, bias, list(stride))
