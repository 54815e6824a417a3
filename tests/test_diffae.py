"""The diffusion autoencoder: schedule and DDIM against diffusers, encode/decode, gradients,
training core and weights I/O. Runs on a CPU in well under a minute (tiny preset)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler

from diffinf_ray.diffae.autoencoder import (
    DiffusionAutoencoder,
    decode,
    encode,
    predict_eps,
    saved_tensor_bytes,
)
from diffinf_ray.diffae.model import NULL_LABEL, DiffAEConfig, build_model, preset
from diffinf_ray.diffae.schedule import (
    NoiseSchedule,
    ddim_inversion_step,
    ddim_step,
    ddim_timesteps,
)
from diffinf_ray.diffae.training import EMA, diffusion_loss, train_step
from diffinf_ray.diffae.weights import (
    EMA_WEIGHTS_FILE,
    WEIGHTS_FILE,
    WeightsError,
    load_autoencoder,
    save_autoencoder,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CI box has 2 cores shared with other jobs; two OpenMP threads there oversubscribe
    # and run an order of magnitude slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n distinct images in [-1, 1]: a coloured Gaussian blob on a coloured background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        centre = torch.rand(2, generator=g) * 1.2 - 0.6
        radius = 0.25 + 0.3 * torch.rand(1, generator=g)
        colour, background = torch.rand(3, generator=g) * 2 - 1, torch.rand(3, generator=g) * 2 - 1
        blob = torch.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * radius**2))
        out.append(background[:, None, None] * (1 - blob) + colour[:, None, None] * blob)
    return torch.stack(out).clamp(-1, 1)


def diffusers_ddim(**kw):
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", **kw)


# -- model ----------------------------------------------------------------------------------------

def test_tiny_model_shapes_and_determinism():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    torch.manual_seed(0)
    again = build_model("tiny").eval()
    x = blob_images(3)
    z = model.encode(x)
    assert z.shape == (3, model.config.z_dim)
    t = torch.tensor([0, 500, 999])
    eps = model(x, t, z)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert torch.equal(eps, again(x, t, again.encode(x)))  # same seed, same network
    assert torch.equal(eps, model(x, t, None, x_start=x))  # encoding inside forward is the same
    assert not torch.allclose(eps, model(x, t, z + 1.0))  # z enters the UNet
    assert not torch.allclose(eps, model(x, t.flip(0), z))  # t enters the UNet


def test_labels_enter_the_unet_and_null_label_is_its_own_embedding():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3).eval()
    x = blob_images(2)
    z = model.encode(x)
    t = torch.tensor([100, 100])
    by_label = {c: model(x, t, z, torch.tensor([c, c])) for c in (0, 1, NULL_LABEL)}
    assert not torch.allclose(by_label[0], by_label[1])
    assert not torch.allclose(by_label[0], by_label[NULL_LABEL])
    assert torch.equal(model(x, t, z, None), by_label[NULL_LABEL])  # None means the null label
    with pytest.raises(ValueError, match="labels must be"):
        model(x, t, z, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="no labels"):
        build_model("tiny")(x, t, z, torch.tensor([0, 0]))


def test_presets_are_consistent_configs():
    for name in ("tiny", "small", "ffhq128", "ffhq256"):
        cfg = preset(name)
        assert DiffAEConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("ffhq256").z_dim == 512 and preset("small").image_size == 64
    with pytest.raises(ValueError, match="divisible"):
        DiffAEConfig(unet_channels=(30, 60), norm_num_groups=8)


# -- schedule against diffusers -------------------------------------------------------------------

def official_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """phizaz/diffae diffusion/diffusion.py:space_timesteps, its "ddimN" branch, verbatim."""
    desired_count = int(section_counts[len("ddim"):])
    for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired_count:
            return set(range(0, num_timesteps, i))
    raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")


def official_step(x, eps, abar, abar_to):
    """The official ddim_sample / ddim_reverse_sample update (eta = 0, clip_denoised=True), in
    float64 as its numpy tables: x0 from eps, clamped, eps re-derived, moved to abar_to."""
    x, eps = x.double(), eps.double()
    x0 = ((1 / abar) ** 0.5 * x - (1 / abar - 1) ** 0.5 * eps).clamp(-1, 1)
    eps = ((1 / abar) ** 0.5 * x - x0) / (1 / abar - 1) ** 0.5
    return x0 * abar_to**0.5 + (1 - abar_to) ** 0.5 * eps


def test_linear_schedule_matches_diffusers():
    ours = NoiseSchedule.linear()
    ref = diffusers_ddim()
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=0)
    # diffusers' "leading" spacing is the official one only where S divides 1000
    for steps in (20, 50, 250):
        ref.set_timesteps(steps)
        assert torch.equal(ours.ddim_timesteps(steps), ref.timesteps), steps
    for steps in (7, 30):
        ref.set_timesteps(steps)
        assert not torch.equal(ours.ddim_timesteps(steps), ref.timesteps), steps


@pytest.mark.parametrize("steps", [2, 3, 7, 10, 20, 30, 50, 100, 250, 1000])
def test_timesteps_equal_official_space_timesteps(steps):
    official = sorted(official_space_timesteps(1000, f"ddim{steps}"))
    assert ddim_timesteps(steps) == official
    assert NoiseSchedule.linear().ddim_timesteps(steps).tolist() == official[::-1]
    decode_grid = [s.timestep for s in NoiseSchedule.linear().sampling_steps(steps)]
    inversion_grid = [s.timestep for s in NoiseSchedule.linear().inversion_steps(steps)]
    assert decode_grid == official[::-1] and inversion_grid == official


@pytest.mark.parametrize("steps", [1, 45, 501, 999])
def test_step_counts_the_official_code_refuses_are_refused(steps):
    with pytest.raises(ValueError, match="integer stride"):
        official_space_timesteps(1000, f"ddim{steps}")
    with pytest.raises(ValueError, match=f"{steps} DDIM steps.*use "):
        ddim_timesteps(steps)
    with pytest.raises(ValueError, match="integer stride"):
        list(NoiseSchedule.linear().sampling_steps(steps))


def test_timesteps_for_other_schedule_lengths_follow_the_same_rule():
    assert ddim_timesteps(4, 100) == sorted(official_space_timesteps(100, "ddim4"))
    assert NoiseSchedule.linear(100).ddim_timesteps(3).tolist() == [68, 34, 0]


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_equals_diffusers_step(clip):
    # clip=True is the official sampler: clamp x0_hat, re-derive eps from it
    ref = diffusers_ddim(clip_sample=clip)
    ref.set_timesteps(20)
    abar = ref.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    for t in ref.timesteps.tolist():
        x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        expected = ref.step(eps, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
        prev = t - 1000 // 20
        # the step formula alone, on diffusers' own float32 noise levels
        got = ddim_step(x, eps, abar[t], abar[prev] if prev >= 0 else 1.0, clip_x0=clip)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # and through our float64 schedule: the same to float32 schedule rounding
    ours = NoiseSchedule.linear()
    for step in ours.sampling_steps(20):
        x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        expected = ref.step(eps, step.timestep, x, use_clipped_model_output=clip).prev_sample
        got = ddim_step(x, eps, step.abar_from, step.abar_to, clip_x0=clip)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [7, 20])
def test_loops_take_the_official_steps(steps):
    """Decode: at tau_{S-1}..tau_0, each to the level below, the last to abar = 1 (official
    alphas_cumprod_prev). Inversion: at tau_0..tau_{S-1}, from its own level to the next, the
    last to abar = 0 (official alphas_cumprod_next), each the official update."""
    schedule = NoiseSchedule.linear()
    abar = schedule.alphas_cumprod
    taus = sorted(official_space_timesteps(1000, f"ddim{steps}"))
    levels = [float(abar[t]) for t in taus]
    decode_loop = list(schedule.sampling_steps(steps))
    assert [(s.timestep, s.abar_from, s.abar_to) for s in decode_loop] == [
        (taus[i], levels[i], levels[i - 1] if i else 1.0) for i in reversed(range(steps))]
    inversion_loop = list(schedule.inversion_steps(steps))
    assert [(s.timestep, s.abar_from, s.abar_to) for s in inversion_loop] == [
        (taus[i], levels[i], levels[i + 1] if i + 1 < steps else 0.0) for i in range(steps)]
    g = torch.Generator().manual_seed(1)
    for step in decode_loop + inversion_loop:
        x, eps = 3 * torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        expected = official_step(x, eps, step.abar_from, step.abar_to)
        got = ddim_inversion_step(x, eps, step.abar_from, step.abar_to)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, ddim_step(x, eps, step.abar_from, step.abar_to))
    # inside [-1, 1] the clamp is idle: abar_to = 0 gives back eps (x_T), abar_to = 1 gives x0
    x0, a = torch.rand(2, 3, 8, 8, generator=g) - 0.5, float(abar[500])
    x = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    torch.testing.assert_close(ddim_inversion_step(x, eps, a, 0.0), eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddim_step(x, eps, a, 1.0), x0, rtol=1e-5, atol=1e-5)


# -- encode / decode ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_tiny():
    """The tiny preset trained briefly on 8 blob images (deterministic, ~150 steps)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images = blob_images(8)
    model = build_model("tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = [train_step(model, optimizer, images, generator=generator) for _ in range(150)]
    return model.eval().requires_grad_(False), images, losses


def test_training_reduces_the_diffusion_loss(trained_tiny):
    _, _, losses = trained_tiny
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)


def test_inversion_then_decoding_reconstructs_better_than_random_noise(trained_tiny):
    model, images, _ = trained_tiny
    with torch.no_grad():
        z, x_T = encode(model, images, steps=20)
        reconstruction = decode(model, z, x_T, steps=20)
        noise = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1))
        from_noise = decode(model, z, noise, steps=20)
    err = (reconstruction - images).square().mean().item()
    err_noise = (from_noise - images).square().mean().item()
    assert err < 0.2 * images.var().item(), err  # most of the image comes back
    assert err < 0.1 * err_noise, (err, err_noise)
    assert 0.7 < x_T.std().item() < 1.3  # inverted latents look like unit noise
    with torch.no_grad():
        assert torch.equal(encode(model, images, steps=20)[1], x_T)  # deterministic


def test_gradients_reach_z_and_x_T_and_checkpointing_does_not_change_them():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2).eval().requires_grad_(False)
    target = blob_images(2)
    grads = {}
    for use_checkpoint in (True, False):
        z = torch.randn(2, model.config.z_dim, generator=torch.Generator().manual_seed(2))
        x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        z.requires_grad_(True)
        x_T.requires_grad_(True)
        out = decode(model, z, x_T, torch.tensor([0, 1]), steps=4, checkpoint=use_checkpoint)
        (out - target).square().mean().backward()
        grads[use_checkpoint] = (z.grad, x_T.grad, out.detach())
    for with_ck, without_ck in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(with_ck, without_ck, rtol=1e-5, atol=1e-5)
    z_grad, x_grad, _ = grads[True]
    assert z_grad.abs().sum() > 0 and x_grad.abs().sum() > 0


def test_checkpointed_decode_keeps_only_step_inputs_for_backward():
    torch.manual_seed(0)
    model = build_model("tiny").eval().requires_grad_(False)
    z = torch.randn(2, model.config.z_dim, requires_grad=True)
    x_T = torch.randn(2, 3, 32, 32, requires_grad=True)

    def saved_bytes(steps, use_checkpoint):
        return saved_tensor_bytes(
            lambda: decode(model, z, x_T, steps=steps, checkpoint=use_checkpoint))

    latent_bytes = 4 * (x_T.numel() + z.numel())
    per_step_ck = (saved_bytes(6, True) - saved_bytes(2, True)) / 4
    per_step_full = (saved_bytes(6, False) - saved_bytes(2, False)) / 4
    assert per_step_ck <= 4 * latent_bytes, per_step_ck  # inputs of the step, not activations
    assert per_step_full > 50 * per_step_ck  # what checkpointing saves


def test_guidance_scale_mixes_label_and_null_predictions():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2).eval()
    x = blob_images(2)
    z = model.encode(x)
    label = torch.tensor([0, 1])
    eps_label = predict_eps(model, x, 300, z, label)
    eps_null = predict_eps(model, x, 300, z, torch.full_like(label, NULL_LABEL))
    torch.testing.assert_close(predict_eps(model, x, 300, z, label, guidance_scale=0.0), eps_null)
    torch.testing.assert_close(
        predict_eps(model, x, 300, z, label, guidance_scale=3.0),
        eps_null + 3.0 * (eps_label - eps_null), rtol=1e-4, atol=1e-4,
    )


def test_wrapper_encodes_without_grad_and_decodes_with_grad():
    torch.manual_seed(0)
    ae = DiffusionAutoencoder(build_model("tiny"), encode_steps=3, decode_steps=3)
    z, x_T = ae.encode(blob_images(1))
    assert not z.requires_grad and not ae.model.training
    z.requires_grad_(True)
    ae.decode(z, x_T).sum().backward()
    assert z.grad is not None and all(p.grad is None for p in ae.model.parameters())


# -- training core --------------------------------------------------------------------------------

def test_diffusion_loss_is_reproducible_and_label_dropout_means_null_label():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2).eval()
    x = blob_images(4)
    label = torch.tensor([0, 1, 0, 1])

    def loss(**kw):
        return diffusion_loss(model, x, kw.pop("label", label), generator=torch.Generator().manual_seed(5), **kw)

    assert loss().item() == loss().item()
    t = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        diffusion_loss(model, x, None, t=t, noise=noise),
        diffusion_loss(model, x, label, t=t, noise=noise, cond_drop_prob=1.0),
    )
    assert diffusion_loss(model, x, label, t=t, noise=noise).item() != pytest.approx(
        diffusion_loss(model, x, None, t=t, noise=noise).item(), rel=1e-6
    )


def test_ema_tracks_the_average_and_copies_it():
    layer = torch.nn.Linear(2, 2)
    ema = EMA(layer, decay=0.9)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * start + 0.1 * (start + 1.0))
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, ema.shadow["weight"])
    with pytest.raises(ValueError):
        EMA(layer, decay=1.0)


# -- weights I/O ----------------------------------------------------------------------------------

def test_save_and_load_round_trip_with_ema_and_hash_checks(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=2).eval()
    ema_state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    manifest = save_autoencoder(model, tmp_path / "ae", ema_state=ema_state)
    saved = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert saved["config"]["num_classes"] == 2 and set(saved["files"]) == {WEIGHTS_FILE, EMA_WEIGHTS_FILE}

    x = blob_images(2)
    t, label = torch.tensor([10, 900]), torch.tensor([0, NULL_LABEL])
    raw = load_autoencoder(tmp_path / "ae", use_ema=False)
    torch.testing.assert_close(raw(x, t, raw.encode(x), label), model(x, t, model.encode(x), label))
    ema_model = load_autoencoder(tmp_path / "ae", sha256=manifest["files"][EMA_WEIGHTS_FILE]["sha256"])
    torch.testing.assert_close(ema_model.unet.conv_in.weight, model.unet.conv_in.weight + 0.01)

    with pytest.raises(WeightsError, match="sha256"):
        load_autoencoder(tmp_path / "ae", sha256="0" * 64)
    weights = tmp_path / "ae" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="recorded"):
        load_autoencoder(tmp_path / "ae", use_ema=False)
