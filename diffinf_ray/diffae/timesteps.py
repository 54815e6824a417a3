"""The official DiffAE timestep spacing (torch-free, so the config can check step counts).

`space_timesteps(T, "ddimS")` of phizaz/diffae (diffusion/diffusion.py) takes range(0, T, k) for
the smallest integer stride k in 1..T-1 that gives exactly S timesteps. With T = 1000: S = 20
gives 0, 50, ..., 950; S = 30 gives 0, 34, ..., 986. Every S from 2 to 36 has one; S = 1, most
counts above 36 (37, 41, 45, 60, ...; 40, 50, 100, 125, 200, 250 are fine) and 501..999 have none
and are refused, as the official code refuses them.
"""

from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000


def ddim_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The official `space_timesteps(T, f"ddim{S}")`, ascending: range(0, T, k) for the smallest
    stride k in 1..T-1 with exactly S values; ValueError where no such stride exists."""
    for stride in range(1, num_train_timesteps):
        if len(range(0, num_train_timesteps, stride)) == steps:
            return list(range(0, num_train_timesteps, stride))
    accepted = [len(range(0, num_train_timesteps, k)) for k in range(1, num_train_timesteps)]
    below = max((s for s in accepted if s < steps), default=None)
    above = min((s for s in accepted if s > steps), default=None)
    nearest = " or ".join(str(s) for s in (below, above) if s is not None)
    raise ValueError(
        f"{steps} DDIM steps: no integer stride takes exactly {steps} of {num_train_timesteps} "
        f"timesteps (the official space_timesteps refuses it); use {nearest}"
    )
