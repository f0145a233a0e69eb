"""Diffusion MAE pieces: the noise schedule, noising of masked patches only, and the patch statistics
used by the iterative sampler to map norm-pix predictions back to pixels.

Schedule (RadDiffusion): 100 steps, beta = linspace(1e-4, 0.2, 100) ** 2, alpha_bar = cumprod(1 - beta);
no timestep embedding. Images live in [-1, 1]; noised values are clipped to that range.
"""

from __future__ import annotations

import torch


class DiffusionSchedule:
    """``betas``, ``alpha_bar``: [steps] float64 tensors (index t = 0 .. steps - 1)."""

    def __init__(self, steps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.2) -> None:
        if steps < 1:
            raise ValueError(f"steps: expected a positive int, got {steps}")
        self.steps = steps
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64) ** 2
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)

    def sample_t(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One uniform timestep per image: [n] long."""
        return torch.randint(0, self.steps, (n,), device=device, generator=generator)

    def noise_masked(
        self, patches: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = sqrt(ab_t)·x + sqrt(1 - ab_t)·noise on masked patches only, visible patches unchanged,
        clipped to [-1, 1]. patches [B, L, P] (pixels), mask [B, L] (1 = masked), t [B]."""
        if t.shape != (patches.shape[0],):
            raise ValueError(f"t: expected one timestep per image, shape ({patches.shape[0]},), got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(patches)
        ab = self.alpha_bar.to(patches.device)[t].to(patches.dtype)[:, None, None]
        noisy = (ab.sqrt() * patches + (1 - ab).sqrt() * noise).clamp(-1.0, 1.0)
        return torch.where(mask[..., None].bool(), noisy, patches)

    def x0_patch_stats(
        self, noisy: torch.Tensor, t: torch.Tensor, eps: float = 1e-6
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimate each clean patch's mean and std from its noisy version x_t [B, L, P] at t [B].

        E[x_t] = sqrt(ab)·mean(x0) and Var[x_t] = ab·var(x0) + (1 - ab), so mean(x0) ~ mean(x_t)/sqrt(ab)
        and var(x0) ~ max(var(x_t) - (1 - ab), 0)/ab (clipping ignored). The sampler needs these because
        the model predicts norm-pix patches whose own statistics are unknown at masked positions.
        """
        ab = self.alpha_bar.to(noisy.device)[t].to(noisy.dtype)[:, None, None]
        mean = noisy.mean(dim=-1, keepdim=True) / ab.sqrt()
        var = (noisy.var(dim=-1, keepdim=True, unbiased=True) - (1 - ab)).clamp_min(0) / ab
        return mean, (var + eps).sqrt()
