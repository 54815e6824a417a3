"""The diffusion autoencoder of METHOD.md stage 5 (Preechakul et al., CVPR 2022).

Modules (import the one you need; nothing heavy is imported here):
- `timesteps`   the official DDIM timestep spacing (torch-free)
- `schedule`    linear DDPM schedule, the official DDIM step and the decode / inversion loops
- `config`      DiffAEConfig + presets (tiny, small, ffhq128, ffhq256): plain data, no torch
- `model`       DiffAEModel (diffusers blocks); re-exports DiffAEConfig, PRESETS, preset
- `autoencoder` encode(x) -> (z, x_T), differentiable decode(z, x_T, label) with checkpointing
- `training`    diffusion_loss, train_step, EMA (the Ray-free training core)
- `weights`     save/load as safetensors + config.json with sha256 checks
- `official`    the official DiffAE architecture, checkpoint conversion and loading
"""
