"""ST-CNNT MRI losses against values computed here, independently, from their formulas (numpy loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fm_engine.models.stcnnt import losses as L


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: one intra-op thread is several times faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gauss(n: int, sigma: float) -> np.ndarray:
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_np(x: np.ndarray, y: np.ndarray, win: np.ndarray, L_: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and cs maps over every valid window position of arrays x, y (any rank = win's rank)."""
    c1, c2 = (0.01 * L_) ** 2, (0.03 * L_) ** 2
    out_shape = tuple(s - w + 1 for s, w in zip(x.shape, win.shape, strict=True))
    s_map, cs_map = np.zeros(out_shape), np.zeros(out_shape)
    for idx in np.ndindex(*out_shape):
        sl = tuple(slice(i, i + w) for i, w in zip(idx, win.shape, strict=True))
        px, py = x[sl], y[sl]
        mx, my = (win * px).sum(), (win * py).sum()
        vx = (win * px * px).sum() - mx * mx
        vy = (win * py * py).sum() - my * my
        cxy = (win * px * py).sum() - mx * my
        cs = (2 * cxy + c2) / (vx + vy + c2)
        cs_map[idx] = cs
        s_map[idx] = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return s_map, cs_map


def _pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(*shape, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(*shape, dtype=torch.float64)).clamp(0, 1)
    return x, y


def test_mse_l1_psnr() -> None:
    x, y = _pair(2, 2, 2, 4, 5)
    a, b = x.numpy().ravel(), y.numpy().ravel()
    mse = sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / a.size
    l1 = sum(abs(p - q) for p, q in zip(a, b, strict=True)) / a.size
    assert abs(float(L.mse_loss(x, y)) - mse) < 1e-12
    assert abs(float(L.l1_loss(x, y)) - l1) < 1e-12
    assert abs(float(L.psnr(x, y, data_range=2.0)) - 10 * math.log10(4.0 / mse)) < 1e-9
    assert abs(float(L.psnr_loss(x, y)) + 10 * math.log10(1.0 / mse)) < 1e-9


def test_ssim_2d_against_loops() -> None:
    x, y = _pair(1, 2, 2, 7, 8)
    g = _gauss(5, 1.5)
    win = np.outer(g, g)
    vals = [_ssim_np(x[0, t, c].numpy(), y[0, t, c].numpy(), win)[0].mean() for t in range(2) for c in range(2)]
    assert abs(float(L.ssim(x, y)) - np.mean(vals)) < 1e-10


def test_ssim_3d_against_loops() -> None:
    x, y = _pair(1, 3, 2, 6, 7)  # T = 3 < 5: the window along T is 3 long
    g, gt = _gauss(5, 1.5), _gauss(3, 1.5)
    win = gt[:, None, None] * g[None, :, None] * g[None, None, :]
    vals = [_ssim_np(x[0, :, c].numpy(), y[0, :, c].numpy(), win)[0].mean() for c in range(2)]
    assert abs(float(L.ssim3d(x, y)) - np.mean(vals)) < 1e-10


def test_ms_ssim_against_loops() -> None:
    x, y = _pair(1, 1, 1, 10, 12)
    g = _gauss(5, 1.5)
    win = np.outer(g, g)
    w = np.array(L.MS_SSIM_WEIGHTS[:2])
    w = w / w.sum()
    a, b = x[0, 0, 0].numpy(), y[0, 0, 0].numpy()
    _, cs0 = _ssim_np(a, b, win)

    def pool(z: np.ndarray) -> np.ndarray:
        h, ww = z.shape[0] // 2, z.shape[1] // 2
        return z[: 2 * h, : 2 * ww].reshape(h, 2, ww, 2).mean(axis=(1, 3))

    s1, _ = _ssim_np(pool(a), pool(b), win)
    expected = max(cs0.mean(), 0) ** w[0] * max(s1.mean(), 0) ** w[1]
    assert abs(float(L.ms_ssim(x, y, levels=2)) - expected) < 1e-10


def test_ssim_of_image_with_itself_is_one() -> None:
    x = torch.rand(2, 5, 1, 16, 16, dtype=torch.float64)
    assert abs(float(L.ssim(x, x)) - 1.0) < 1e-12
    assert abs(float(L.ssim3d(x, x)) - 1.0) < 1e-12
    assert abs(float(L.ms_ssim(x, x, levels=2)) - 1.0) < 1e-12
    assert float(L.ssim(x, torch.rand_like(x))) < 0.9


def test_perpendicular_against_complex_loop() -> None:
    x, y = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64), torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    terms = []
    for t in range(2):
        for i in range(3):
            for j in range(3):
                X = complex(float(x[0, t, 0, i, j]), float(x[0, t, 1, i, j]))
                Y = complex(float(y[0, t, 0, i, j]), float(y[0, t, 1, i, j]))
                p = abs(X.real * Y.imag - X.imag * Y.real) / abs(X)
                angle = math.atan2(X.imag, X.real) - math.atan2(Y.imag, Y.real)
                terms.append(p if math.cos(angle) >= 0 else 2 * abs(Y) - p)
    assert abs(float(L.perpendicular_loss(x, y)) - np.mean(terms)) < 1e-6
    with pytest.raises(ValueError, match="C = 2"):
        L.perpendicular_loss(x[:, :, :1], y[:, :, :1])


def _deriv_conv_np(img: np.ndarray, sigma: float) -> list[np.ndarray]:
    r = math.ceil(3 * sigma)
    xs = np.arange(-r, r + 1)
    g = np.exp(-(xs**2) / (2 * sigma**2))
    g = g / g.sum()
    dg = -xs / sigma**2 * g
    outs = []
    for k in (np.outer(dg, g), np.outer(g, dg)):  # d/dH, d/dW
        pad = np.pad(img, r)
        out = np.zeros_like(img)
        for i in range(img.shape[0]):
            for j in range(img.shape[1]):
                out[i, j] = (pad[i : i + 2 * r + 1, j : j + 2 * r + 1] * k).sum()  # cross-correlation, like conv2d
        outs.append(out)
    return outs


def test_gaussian_deriv_2d_against_loops() -> None:
    x, y = _pair(1, 1, 1, 5, 6)
    sigmas = (0.5, 1.0)
    vals = []
    for s in sigmas:
        for dx, dy in zip(_deriv_conv_np(x[0, 0, 0].numpy(), s), _deriv_conv_np(y[0, 0, 0].numpy(), s), strict=True):
            vals.append(np.abs(dx - dy).mean())
    assert abs(float(L.gaussian_deriv_loss(x, y, sigmas=sigmas)) - np.mean(vals)) < 1e-10


def test_gaussian_deriv_3d_against_loops() -> None:
    x, y = _pair(1, 3, 1, 4, 5)
    sigma, r = 0.5, 2  # half-width ceil(3 * 0.5)
    xs = np.arange(-r, r + 1)
    g = np.exp(-(xs**2) / (2 * sigma**2))
    g = g / g.sum()
    dg = -xs / sigma**2 * g
    d = np.pad((x - y)[0, :, 0].numpy(), r)  # [T, H, W] zero padded
    vals = []
    for axis in range(3):
        vecs = [dg if a == axis else g for a in range(3)]
        k = vecs[0][:, None, None] * vecs[1][None, :, None] * vecs[2][None, None, :]
        out = np.zeros((3, 4, 5))
        for idx in np.ndindex(3, 4, 5):
            out[idx] = (d[idx[0] : idx[0] + 5, idx[1] : idx[1] + 5, idx[2] : idx[2] + 5] * k).sum()
        vals.append(np.abs(out).mean())
    assert abs(float(L.gaussian_deriv_loss(x, y, sigmas=(sigma,), dims=3)) - np.mean(vals)) < 1e-10


def test_weighted_combination_and_errors() -> None:
    x, y = _pair(1, 2, 2, 8, 8)
    loss = L.MRILoss(
        losses=("mse", "l1", "ssim", "perpendicular", "gaussian_deriv3d"), weights=(1.0, 2.0, 0.5, 3.0, 4.0)
    )
    mag_x = torch.sqrt(x[:, :, :1] ** 2 + x[:, :, 1:] ** 2 + torch.finfo(torch.float64).eps)
    mag_y = torch.sqrt(y[:, :, :1] ** 2 + y[:, :, 1:] ** 2 + torch.finfo(torch.float64).eps)
    expected = (
        float(((x - y) ** 2).mean())
        + 2.0 * float((x - y).abs().mean())
        + 0.5 * (1 - float(L.ssim(mag_x, mag_y)))
        + 3.0 * float(L.perpendicular_loss(x, y))
        + 4.0 * float(L.gaussian_deriv_loss(mag_x, mag_y, dims=3))
    )
    assert abs(float(loss(x, y)) - expected) < 1e-10
    with pytest.raises(ValueError, match="unknown loss 'foo'"):
        L.MRILoss(losses=("foo",))
    with pytest.raises(ValueError, match="2 losses but 1 weights"):
        L.MRILoss(losses=("mse", "l1"), weights=(1.0,))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        L.ssim(x[..., :4, :4], y[..., :4, :4])
    with pytest.raises(ValueError, match="too small for 3 levels"):
        L.ms_ssim(x, y, levels=3)
    with pytest.raises(ValueError, match="differ in shape"):
        L.mse_loss(x, y[:, :1])
