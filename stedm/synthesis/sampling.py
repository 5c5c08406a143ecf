"""The sampling loop: DDIM or DPM-Solver++ with classifier-free guidance over style.

One denoising step, for a batch of B samples sharing nothing but the model:

    eps_c = UNet(z_t, t, layout, style)        eps_u = UNet(z_t, t, layout, null style)
    eps   = eps_u + s * (eps_c - eps_u)                                  (guidance scale s)
    eps   = phi * eps * std(eps_c) / std(eps) + (1 - phi) * eps          (guidance rescale phi)

- Both branches run in ONE UNet call on a batch of 2B (the official code makes two calls per
  step); with s = 1 the null branch is skipped (plain conditional sampling), and so it is when
  the model has no style at all (`none`, a layout-only LDM). The layout is never dropped.
- Guidance rescale is the textbook one (Lin et al. 2023, "Common diffusion noise schedules and
  sample steps are flawed", eq. 15-16; diffusers' `rescale_noise_cfg`): one std per sample over
  ALL non-batch dims, mixed with the GUIDED prediction. The official STEDM code takes the std over
  (channel, height) only and mixes with the conditional prediction (stedm-method.md §1.8, B6);
  `rescale_guidance(..., official=True)` reproduces that for comparison.
- Samplers (both on the paper's training schedule, `NOISE_SCHEDULE`):
  `ddim` (paper fidelity: eta = 0, LDM's "uniform" discretisation, so `steps=128` runs the 143
  steps t = 995, 988, ..., 1 the official code runs, §1.9 B7), and `dpm_solver++` (default:
  diffusers' `DPMSolverMultistepScheduler`, 2nd order, 20 steps; ~7x fewer UNet calls for images
  of the same quality, see benchmarks/sampling.py).

Every sample's initial noise comes from its own generator seeded with the sample's seed, so a
sample does not depend on which other samples share its batch (up to the float rounding of
batched kernels, which is why generation keeps its micro-batches fixed).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from stedm.errors import StedmError
from stedm.models.autoencoder import Autoencoder, decode
from stedm.models.denoiser import NOISE_SCHEDULE, make_noise_scheduler
from stedm.models.stedm import StedmModel

SAMPLERS = ("dpm_solver++", "ddim")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample (the `synthesis` config section's sampler fields).

    Attributes:
        sampler: "dpm_solver++" or "ddim".
        steps: sampler steps (ddim: nominal LDM steps, 128 runs 143).
        guidance_scale: s >= 1; 1 = plain conditional sampling.
        guidance_rescale: phi in [0, 1]; 0 = no rescale.
        batched_cfg: both guidance branches in one UNet call (False = two calls, as the paper).
    """

    sampler: str = "dpm_solver++"
    steps: int = 20
    guidance_scale: float = 1.5
    guidance_rescale: float = 0.7
    batched_cfg: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise StedmError(
                f"config key 'synthesis.sampler': {self.sampler!r} is not one of {list(SAMPLERS)}"
            )
        if not 1 <= self.steps <= NOISE_SCHEDULE["num_train_timesteps"]:
            raise StedmError(f"config key 'synthesis.steps': must be in 1..1000, got {self.steps}")
        if self.guidance_scale < 1:
            raise StedmError(
                f"config key 'synthesis.guidance_scale': must be >= 1, got {self.guidance_scale}"
            )
        if not 0 <= self.guidance_rescale <= 1:
            raise StedmError(
                f"config key 'synthesis.guidance_rescale': must be in [0, 1], got {self.guidance_rescale}"
            )

    @classmethod
    def from_config(cls, synthesis) -> SamplingSettings:
        """From a `SynthesisConfig` (or anything with the same attributes)."""
        return cls(
            sampler=synthesis.sampler,
            steps=int(synthesis.steps),
            guidance_scale=float(synthesis.guidance_scale),
            guidance_rescale=float(synthesis.guidance_rescale),
        )


# --------------------------------------------------------------------------- schedulers
def ldm_uniform_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """LDM's DDIM "uniform" timesteps, descending: range(0, T, T // steps) + 1 (128 -> 143 steps)."""
    stride = num_train_timesteps // steps
    return torch.arange(0, num_train_timesteps, stride, dtype=torch.long).flip(0) + 1


def make_sampler(
    name: str, steps: int, prediction_type: str = "epsilon"
) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh scheduler for one batch, its timesteps set (schedulers carry per-run state)."""
    if name == "ddim":
        scheduler = make_noise_scheduler("ddim", prediction_type)
        scheduler.set_timesteps(steps)  # step() computes t_prev = t - 1000 // steps ...
        scheduler.timesteps = ldm_uniform_timesteps(steps)  # ... which these timesteps follow
        return scheduler
    if name == "dpm_solver++":
        # the SAME betas as training; keys DPM-Solver does not know (clip_sample) are left out
        accepted = inspect.signature(DPMSolverMultistepScheduler.__init__).parameters
        schedule = {k: v for k, v in NOISE_SCHEDULE.items() if k in accepted}
        scheduler = DPMSolverMultistepScheduler(
            **{**schedule, "prediction_type": prediction_type}, algorithm_type="dpmsolver++", solver_order=2
        )
        scheduler.set_timesteps(steps)
        return scheduler
    raise StedmError(f"unknown sampler {name!r}; allowed: {list(SAMPLERS)}")


# --------------------------------------------------------------------------- guidance
def _std(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.std(dim=tuple(dims), keepdim=True)


def rescale_guidance(
    eps_cfg: torch.Tensor, eps_cond: torch.Tensor, phi: float, *, official: bool = False
) -> torch.Tensor:
    """Guidance rescale: phi * eps_cfg * std(eps_cond) / std(eps_cfg) + (1 - phi) * eps_cfg.

    Textbook (Lin et al. 2023): std per sample over all non-batch dims. `official=True` is the
    STEDM code's variant: std over dims (1, 2) only and the mix with `eps_cond` instead of
    `eps_cfg` (kept for comparisons; generation never uses it).
    """
    if phi == 0:
        return eps_cfg
    dims = (1, 2) if official else tuple(range(1, eps_cfg.ndim))
    rescaled = eps_cfg * (_std(eps_cond, dims) / _std(eps_cfg, dims))
    return phi * rescaled + (1.0 - phi) * (eps_cond if official else eps_cfg)


def guide(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rescale: float
) -> torch.Tensor:
    """Classifier-free guidance e_u + s (e_c - e_u), then the textbook rescale."""
    eps = eps_uncond + scale * (eps_cond - eps_uncond)
    return rescale_guidance(eps, eps_cond, rescale)


def predict_eps(
    model: StedmModel,
    latents: torch.Tensor,
    t: torch.Tensor,
    layout: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor | None,
    settings: SamplingSettings,
) -> torch.Tensor:
    """The guided ε of one step. `null_cond` None (or s = 1) = plain conditional prediction."""
    b = latents.shape[0]
    if null_cond is None or settings.guidance_scale == 1:
        return model(latents, t.expand(b), layout, cond=cond)
    if settings.batched_cfg:
        both = model(
            torch.cat([latents, latents]),
            t.expand(2 * b),
            torch.cat([layout, layout]),
            cond=torch.cat([cond, null_cond]),
        )
        eps_c, eps_u = both.chunk(2)
    else:  # the paper's two calls per step
        eps_c = model(latents, t.expand(b), layout, cond=cond)
        eps_u = model(latents, t.expand(b), layout, cond=null_cond)
    return guide(eps_c, eps_u, settings.guidance_scale, settings.guidance_rescale)


@torch.no_grad()
def sample_latents(
    model: StedmModel,
    noise: torch.Tensor,
    layout: torch.Tensor,
    cond: torch.Tensor,
    null_cond: torch.Tensor | None,
    settings: SamplingSettings,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise `noise` (B, C, h, w) conditioned on `layout` (B, L, H, W) and style `cond`."""
    scheduler = make_sampler(settings.sampler, settings.steps, model.config.prediction_type)
    latents = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(latents, t)
        t_dev = t.to(device=latents.device).reshape(1)
        eps = predict_eps(model, x, t_dev, layout, cond, null_cond, settings)
        if settings.sampler == "ddim":
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        else:
            latents = scheduler.step(eps, t, latents).prev_sample
        if on_step is not None:
            on_step(i)
    return latents


# --------------------------------------------------------------------------- one batch, end to end
def initial_noise(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """(B, *shape) standard normal noise; sample i from its own CPU generator seeded `seeds[i]`.

    Drawn on the CPU so a seed gives the same noise on every device.
    """
    out = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    return torch.stack(out).to(device)


def latent_shape(model: StedmModel, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the latent of an image of `height` x `width` px (f = 4 autoencoder)."""
    return (model.config.latent_channels, height // 4, width // 4)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    return (
        ((images.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
    )


@torch.no_grad()
def synthesize(
    model: StedmModel,
    ae: Autoencoder,
    layout: torch.Tensor,
    style_set: torch.Tensor | None,
    seeds: Sequence[int],
    settings: SamplingSettings,
    *,
    null_cond: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Images (B, H, W, 3) uint8 for layouts (B, L, H, W) and style sets (B, n, 3, T, T).

    `style_set` None means no style (the layout-only model, or `none` sampling): the model's
    null condition is used and guidance is off. `null_cond` (1 or B rows) may be passed in to
    reuse it across batches; it is computed here otherwise.
    """
    device = next(model.parameters()).device
    b, _, height, width = layout.shape
    layout = layout.to(device)
    no_style = style_set is None or model.style_encoder is None
    if no_style:
        cond, null_cond = model.null_cond(b, device=device), None
    else:
        style_set = style_set.to(device)
        cond = model.encode_style(style_set)
        if settings.guidance_scale == 1:
            null_cond = None
        else:
            if null_cond is None:
                n, size = style_set.shape[1], style_set.shape[-1]
                null_cond = model.null_cond(1, n_style=n, style_size=size, device=device)
            null_cond = null_cond.to(device).expand(b, *null_cond.shape[1:])
    noise = initial_noise(seeds, latent_shape(model, height, width), device)
    latents = sample_latents(model, noise, layout, cond, null_cond, settings, on_step)
    return to_uint8(decode(ae, latents))
