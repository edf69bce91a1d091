"""Fit a small ``AutoencoderKL`` to images, so that a latent model made from a preset can be sampled.

The ``tiny`` presets of ``sd`` and ``controlnet`` build their VAE at random: enough to test the code
paths, but a random decoder does not invert a random encoder, so the samples of a latent model
trained on it are not images, and nothing measured on them (a ControlNet's condition re-extracted
from its samples, say) means anything. ``fit_autoencoder`` trains the VAE the way Rombach et al.
(2022, Sec. 3 and appendix G) do, reduced to what a tiny one needs: reconstruction error plus a
small KL term towards the standard normal (their "KL-reg" autoencoder, without the perceptual and
adversarial losses, which need pretrained networks), then ``set_latent_scaling`` sets
``scaling_factor`` to 1 / (standard deviation of the latents), the rule behind SD's 0.18215, so the
diffusion model sees unit-variance latents.

Written by hand: diffusers ships no VAE training loop (its examples train the UNet on a frozen VAE).
"""

from __future__ import annotations

import torch

__all__ = ["fit_autoencoder", "reconstruction_error", "set_latent_scaling"]


def fit_autoencoder(vae, images: torch.Tensor, steps: int, batch_size: int = 64, learning_rate: float = 1e-3,
                    kl_weight: float = 1e-4, seed: int = 0, log_every: int = 0) -> list:
    """Train ``vae`` (an ``AutoencoderKL``) in place on ``images`` ((N, C, H, W) in [-1, 1]).

    Each step draws a batch (a seeded generator: the same call trains the same weights), encodes it,
    decodes a posterior sample, and minimises the mean squared reconstruction error plus ``kl_weight``
    times the KL divergence of the posterior from N(0, I) per latent element. Returns the loss of
    every step (and prints every ``log_every`` steps when > 0). The VAE is left in eval mode with no
    gradients, as the trainers expect a frozen VAE."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must be (N, {vae.config.in_channels}, H, W) in [-1, 1], got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    vae.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    losses = []
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[index].to(vae.device, vae.dtype)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x)
        reconstruction = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = torch.nn.functional.mse_loss(reconstruction, x) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"autoencoder step {step + 1}/{steps}: loss {losses[-1]:.5f}", flush=True)
    vae.requires_grad_(False)
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_scaling(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of the posterior means of ``images`` (Rombach et
    al. 2022, Sec. 4.3.2 / SD's 0.18215) and return it."""
    means = torch.cat([vae.encode(images[i:i + batch_size].to(vae.device, vae.dtype)).latent_dist.mean
                       for i in range(0, len(images), batch_size)])
    factor = 1.0 / float(means.float().std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error of ``decode(posterior mean)`` against ``images`` (both in [-1, 1])."""
    total, count = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += float(((reconstruction - x) ** 2).sum())
        count += x.numel()
    return total / count
