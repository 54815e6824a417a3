"""The frozen loss networks of the edit objective: ArcFace from ONNX (checked against
onnxruntime and insightface's alignment), BiSeNet's checkpoint layout, the perceptual distance
and its fallbacks, the self-trained identity embedder and parser, and the loss terms over them."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from diffinf_ray.edit import identity as ident
from diffinf_ray.edit import parsing, perceptual
from diffinf_ray.edit.losses import EditLosses
from diffinf_ray.models.weights import WeightsError

torch.set_num_threads(1)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1] (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                           align_corners=False).clamp(-1, 1)


# -- ArcFace from ONNX --------------------------------------------------------------------------

def _arcface_like_onnx(path, mxnet_style: bool = False) -> None:
    """A tiny recognition graph with insightface's contract: input "input.1" (N, 3, 112, 112),
    one output (N, 512); conv-PReLU-conv-BN-pool-Gemm. `mxnet_style` prepends the Sub/Mul
    normalisation that mxnet conversions carry, so the graph takes raw [0, 255] pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape, scale=0.1):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("slope", 8, 1, 1),
             init("w2", 16, 8, 3, 3), init("gamma", 16), init("beta", 16), init("mu", 16),
             numpy_helper.from_array(np.full(16, 0.5, np.float32), "var"),
             init("wf", 512, 16), init("bf", 512)]
    nodes, first = [], "input.1"
    if mxnet_style:
        inits += [numpy_helper.from_array(np.array(127.5, np.float32), "sub_c"),
                  numpy_helper.from_array(np.array(1 / 127.5, np.float32), "mul_c")]
        nodes += [helper.make_node("Sub", ["input.1", "sub_c"], ["s"], name="_minusscalar0"),
                  helper.make_node("Mul", ["s", "mul_c"], ["m"], name="_mulscalar0")]
        first = "m"
    nodes += [
        helper.make_node("Conv", [first, "w1", "b1"], ["c1"], name="Conv_0", strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("PRelu", ["c1", "slope"], ["p1"], name="PRelu_1"),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="Conv_2", strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mu", "var"], ["bn"],
                         name="BatchNormalization_3"),
        helper.make_node("GlobalAveragePool", ["bn"], ["gap"], name="GlobalAveragePool_4"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="Flatten_5"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["683"], name="Gemm_6", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "arcface_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("arcface") / "w600k_like.onnx"
    _arcface_like_onnx(path)
    return path


def test_arcface_onnx_matches_onnxruntime_and_passes_gradients(arcface_file):
    import onnxruntime as ort

    model = ident.load_arcface_onnx(str(arcface_file), _sha(arcface_file))
    assert (model.input_mean, model.input_std) == (127.5, 127.5)  # our [-1, 1] RGB as is
    x = _smooth_images(3, 128)
    blob = model.preprocess(x)
    assert blob.shape == (3, 3, 112, 112)
    session = ort.InferenceSession(str(arcface_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input.1": blob.numpy()})[0]
    with torch.no_grad():
        got = model(x)
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=1e-4)

    x = x.clone().requires_grad_(True)
    model(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_arcface_wrong_or_missing_sha256_is_a_clear_error(arcface_file):
    with pytest.raises(WeightsError, match=r"w600k_like\.onnx.*sha256.*does not match"):
        ident.load_arcface_onnx(str(arcface_file), "0" * 64)
    with pytest.raises(WeightsError, match="give the ArcFace file's sha256"):
        ident.load_arcface_onnx(str(arcface_file), None)
    with pytest.raises(WeightsError, match="not found"):
        ident.load_arcface_onnx(str(arcface_file.with_name("absent.onnx")), "0" * 64)


def test_mxnet_style_graph_takes_raw_pixels_and_gives_the_same_embedding(tmp_path, arcface_file):
    mx_path = tmp_path / "mxnet_like.onnx"
    _arcface_like_onnx(mx_path, mxnet_style=True)
    plain = ident.load_arcface_onnx(str(arcface_file), _sha(arcface_file))
    mx = ident.load_arcface_onnx(str(mx_path), _sha(mx_path))
    assert (mx.input_mean, mx.input_std) == (0.0, 1.0)  # insightface's rule for such graphs
    x = _smooth_images(2, 112)
    with torch.no_grad():
        torch.testing.assert_close(mx(x), plain(x), atol=1e-4, rtol=1e-4)


def test_ffhq_to_arcface_warp_matches_insightface_norm_crop():
    """Our differentiable crop equals insightface's cv2 `norm_crop` given the FFHQ landmarks."""
    from insightface.utils import face_align

    size = 144  # below the ~150 px where the crop would first resize (cv2 does not)
    x = _smooth_images(1, size, seed=3)
    image = ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
    # the template's continuous coordinates scaled from 512 px to `size`
    landmarks = (ident.FFHQ_TEMPLATE_512 + 0.5) * size / 512 - 0.5
    expected = face_align.norm_crop(image, landmarks.astype(np.float32), 112) / 127.5 - 1
    got = ident.align_ffhq_to_arcface(x)[0].permute(1, 2, 0).numpy()
    inner = (slice(4, -4), slice(4, -4))  # cv2 and grid_sample differ at the border pixels
    assert np.abs(got[inner] - expected[inner]).max() < 0.02


# -- BiSeNet -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bisenet_state():
    torch.manual_seed(0)
    return parsing.BiSeNet(19).state_dict()


def _save_state(state, path):
    torch.save(state, path)
    return _sha(path)


@pytest.fixture(scope="module")
def bisenet_file(tmp_path_factory, bisenet_state):
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    return path, _save_state(bisenet_state, path)


def test_bisenet_has_the_released_checkpoint_layout(bisenet_state):
    # names of zllrunning/face-parsing.PyTorch's 79999_iter.pth (model.py + resnet.py)
    for key in ("cp.resnet.conv1.weight", "cp.resnet.layer2.0.downsample.0.weight",
                "cp.resnet.layer4.1.bn2.running_var", "cp.arm16.conv.conv.weight",
                "cp.arm32.conv_atten.weight", "cp.arm32.bn_atten.weight",
                "cp.conv_head32.conv.weight", "cp.conv_head16.bn.weight",
                "cp.conv_avg.conv.weight", "ffm.convblk.conv.weight", "ffm.conv1.weight",
                "ffm.conv2.weight", "conv_out.conv.conv.weight", "conv_out.conv_out.weight",
                "conv_out16.conv_out.weight", "conv_out32.conv.bn.running_mean"):
        assert key in bisenet_state, key
    assert bisenet_state["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)
    assert bisenet_state["conv_out16.conv_out.weight"].shape == (19, 64, 1, 1)
    assert not any(k.startswith("sp.") for k in bisenet_state)  # no spatial path in that repo
    params = sum(v.numel() for k, v in bisenet_state.items() if "num_batches" not in k)
    assert 13.2e6 < params < 13.4e6  # the ~53 MB float32 file


def test_bisenet_checkpoint_loads_strictly_and_parses_at_input_size(tmp_path, bisenet_state,
                                                                    bisenet_file):
    path, sha = bisenet_file
    parser = parsing.load_bisenet(str(path), sha, input_size=64)
    for key, value in parser.net.state_dict().items():
        assert torch.equal(value, bisenet_state[key]), key
    x = _smooth_images(2, 48).requires_grad_(True)
    logits = parser(x)
    assert logits.shape == (2, 19, 48, 48)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    assert parser.net(torch.zeros(1, 3, 64, 64)).shape == (1, 19, 64, 64)

    # DataParallel's "module." prefix and a {"state_dict": ...} wrapper are accepted
    wrapped = tmp_path / "wrapped.pth"
    sha = _save_state({"state_dict": {f"module.{k}": v for k, v in bisenet_state.items()}},
                      wrapped)
    parsing.load_bisenet(str(wrapped), sha, input_size=64)


def test_bisenet_key_mismatch_or_hash_mismatch_names_the_file(tmp_path, bisenet_state,
                                                              bisenet_file):
    missing = dict(bisenet_state)
    del missing["ffm.conv1.weight"]
    path = tmp_path / "missing.pth"
    with pytest.raises(WeightsError, match=r"missing\.pth.*1 missing keys.*ffm\.conv1\.weight"):
        parsing.load_bisenet(str(path), _save_state(missing, path))
    extra = dict(bisenet_state, **{"sp.conv1.conv.weight": torch.zeros(1)})
    path = tmp_path / "extra.pth"
    with pytest.raises(WeightsError, match=r"extra\.pth.*1 unexpected keys.*sp\.conv1"):
        parsing.load_bisenet(str(path), _save_state(extra, path))
    path, sha = bisenet_file
    with pytest.raises(WeightsError, match=r"79999_iter\.pth.*does not match"):
        parsing.load_bisenet(str(path), "f" * 64)
    with pytest.raises(WeightsError, match=r"79999_iter\.pth.*BiSeNet\(7\)"):
        parsing.load_bisenet(str(path), sha, num_classes=7)


# -- perceptual distance ------------------------------------------------------------------------

@pytest.fixture()
def no_hub_cache(tmp_path, monkeypatch):
    """A torch hub cache without LPIPS backbone weights (as on this build box)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def alexnet_backbone(tmp_path_factory):
    """A torchvision alexnet state dict file (random weights; only the `features.*` trunk lpips
    uses, to keep it small) and its sha256."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-backbone.pth"
    state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path, _sha(path)


def test_lpips_backbone_by_uri_is_checked_and_loaded_into_the_trunk(alexnet_backbone,
                                                                   no_hub_cache):
    path, sha = alexnet_backbone
    dist = perceptual.load_perceptual("alex", str(path), sha)
    assert dist.name == "lpips-alex" and dist.source.endswith("alexnet-backbone.pth")
    state = torch.load(path, weights_only=True)
    trunk = dist.network.net.state_dict()
    assert torch.equal(trunk["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(trunk["slice5.10.bias"], state["features.10.bias"])
    with pytest.raises(WeightsError, match=r"alexnet-backbone\.pth.*does not match"):
        perceptual.load_perceptual("alex", str(path), "0" * 64)
    with pytest.raises(WeightsError, match=r"alexnet-backbone\.pth.*missing"):
        perceptual.load_perceptual("squeeze", str(path), sha)  # another trunk's file


def test_without_backbone_weights_the_fallback_is_named(no_hub_cache):
    embedder = ident.IdentityEmbedder(embed_dim=16)
    dist = perceptual.load_perceptual("alex", fallback="identity_features", identity_net=embedder)
    assert dist.name == "fallback: identity-embedder feature distance (no LPIPS backbone weights)"
    assert "no alex backbone weights at" in dist.source
    assert perceptual.load_perceptual(fallback="ssim").name == (
        "fallback: 1 - SSIM (no LPIPS backbone weights)")
    with pytest.raises(WeightsError, match="no fallback"):
        perceptual.load_perceptual(fallback=None)
    with pytest.raises(ValueError, match="needs identity_net"):
        perceptual.load_perceptual(fallback="identity_features")


def test_a_corrupt_hub_cache_file_is_an_error_not_a_silent_fallback(no_hub_cache):
    from diffinf_ray.diffae.quality import lpips_backbone_path

    path, _ = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="does not start with"):
        perceptual.load_perceptual("alex", identity_net=ident.IdentityEmbedder(embed_dim=16))


def test_conv_feature_fallback_for_nets_without_feature_maps(arcface_file):
    arcface = ident.load_arcface_onnx(str(arcface_file), _sha(arcface_file))
    maps = perceptual.feature_maps(arcface, _smooth_images(2, 64))
    assert [tuple(m.shape[2:]) for m in maps] == [(56, 56), (28, 28)]
    dist = perceptual.load_perceptual(backbone_uri=None, identity_net=arcface)
    assert dist.name.startswith("fallback: ArcFaceIdentity conv feature distance")


# -- the loss terms over these networks ----------------------------------------------------------

def _perceptual_options(alexnet_backbone, embedder):
    path, sha = alexnet_backbone
    return {
        "lpips": perceptual.load_perceptual("alex", str(path), sha),
        "identity_features": perceptual.load_perceptual(fallback="identity_features",
                                                        identity_net=embedder),
        "ssim": perceptual.load_perceptual(fallback="ssim"),
    }


def test_losses_are_zero_for_identical_images_grow_with_noise_and_reach_x(alexnet_backbone,
                                                                          no_hub_cache):
    torch.manual_seed(0)
    embedder, parser = ident.IdentityEmbedder(embed_dim=32), parsing.SmallParser(7)
    x_ref = _smooth_images(3, 48, seed=1)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x_ref.shape, generator=g)
    for name, dist in _perceptual_options(alexnet_backbone, embedder).items():
        losses = EditLosses(embedder, parser, dist)
        ref = losses.reference(x_ref)
        same = losses.terms(x_ref.clone(), ref)
        for term, value in same.items():
            assert value.abs().max() < 1e-5, (name, term, value)
        means = []
        for std in (0.05, 0.2, 0.6):
            means.append({k: float(v.mean()) for k, v in
                          losses.terms(x_ref + std * noise, ref).items()})
        for term in ("id", "struct", "perc", "pixel"):
            values = [m[term] for m in means]
            assert 0 < values[0] < values[1] < values[2], (name, term, values)

        x = (x_ref + 0.1 * noise).requires_grad_(True)
        terms = losses.terms(x, ref)
        for term, value in terms.items():
            (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, term)


# -- training on synthfaces ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthfaces_draw():
    from PIL import Image

    from diffinf_ray.data import synthfaces as sf
    from diffinf_ray.data.images import to_tensor_batch

    spec = sf.SynthFacesSpec(task="age", resolution=32, seed=0, num_identities=24)
    rows = sf.generate_batch(spec, np.arange(160))
    images = torch.from_numpy(to_tensor_batch(list(rows["image"])))
    masks = torch.from_numpy(np.stack(
        [np.asarray(Image.open(io.BytesIO(m))) for m in rows["mask"]]).astype(np.int64))
    return images, [str(i) for i in rows["identity"]], masks


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_identity_embedder_trains_deterministically_and_round_trips(tmp_path, synthfaces_draw):
    images, identities, _ = synthfaces_draw
    kwargs = dict(embed_dim=32, epochs=2, batch_size=32, seed=5, log=lambda _: None)
    model, report = ident.train_identity_embedder(images, identities, **kwargs)
    again, report_again = ident.train_identity_embedder(images, identities, **kwargs)
    assert _same_weights(model, again)
    report.pop("seconds"), report_again.pop("seconds")
    assert report == report_again
    assert report["train_identities"] + report["val_identities"] == len(set(identities))
    assert report["val_identities"] == round(0.2 * len(set(identities)))
    assert 0.0 <= report["verification_auroc"] <= 1.0 and report["epochs"] == 2

    ident.save_identity_embedder(model, tmp_path / "identity")
    loaded = ident.load_identity_embedder(str(tmp_path / "identity"))
    with torch.no_grad():
        out = model(images[:8])
        assert torch.equal(out, loaded(images[:8]))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8))

    weights = tmp_path / "identity" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*recorded in config\.json"):
        ident.load_identity_embedder(tmp_path / "identity")


def test_parser_trains_deterministically_and_round_trips(tmp_path, synthfaces_draw):
    images, _, masks = synthfaces_draw
    kwargs = dict(num_regions=7, epochs=2, batch_size=32, seed=5, log=lambda _: None)
    model, report = parsing.train_parser(images, masks, **kwargs)
    again, report_again = parsing.train_parser(images, masks, **kwargs)
    assert _same_weights(model, again)
    report.pop("seconds"), report_again.pop("seconds")
    assert report == report_again
    assert report["val_images"] == 16 and report["epochs"] == 2
    assert len(report["val_iou_per_region"]) == 7
    assert 0.0 <= report["val_mean_iou"] <= 1.0 and 0.0 <= report["val_pixel_accuracy"] <= 1.0

    parsing.save_parser(model, tmp_path / "parsing")
    loaded = parsing.load_parser(tmp_path / "parsing")
    with torch.no_grad():
        assert torch.equal(model(images[:8]), loaded(images[:8]))
    assert loaded(images[:2]).shape == (2, 7, 32, 32)

    with pytest.raises(ValueError, match="outside"):
        parsing.train_parser(images[:4], masks[:4] + 7, epochs=1, log=lambda _: None)


def test_self_trained_loss_networks_are_read_from_the_run_root_that_holds_them(tmp_path):
    """lossnets.json names a network the run trained by its folder in the run root, so a run
    root that was moved (or copied to another machine) still loads its own networks."""
    import shutil

    import pyarrow as pa

    from diffinf_ray.artifacts import load_edit_losses
    from diffinf_ray.config import load_config
    from diffinf_ray.data import synthfaces as sf
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.stages.lossnets import run_lossnets

    spec = sf.SynthFacesSpec(task="age", resolution=32, seed=0, num_identities=12)
    rows = sf.generate_batch(spec, np.arange(48))
    (tmp_path / "old" / "manifest").mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: rows[k] for k in ("sample_id", "split", "image", "identity",
                                                  "mask")}),
                   tmp_path / "old" / "manifest" / "part-0.parquet")
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"run.root={tmp_path / 'old'}", "lossnets.identity_epochs=1", "lossnets.parsing_epochs=1"])
    record = run_lossnets(cfg, RunRoot(str(tmp_path / "old")))
    assert (record["identity"], record["parsing"]) == ("self_trained", "self_trained")
    shutil.move(tmp_path / "old", tmp_path / "new")
    losses, _ = load_edit_losses(cfg, RunRoot(str(tmp_path / "new")))
    trained = ident.load_identity_embedder(str(tmp_path / "new" / "lossnets" / "identity"))
    assert _same_weights(losses.identity, trained)
    assert losses.parsing is not None


def test_without_a_parser_the_structure_term_is_refused_unless_its_weight_is_zero(tmp_path):
    """No BiSeNet checkpoint and no `mask` column: lossnets trains no parser, and the edit stage's
    losses refuse a weighted structure term (it would silently count as zero) and name the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffinf_ray.artifacts import load_edit_losses
    from diffinf_ray.config import ConfigError, load_config
    from diffinf_ray.data import synthfaces as sf
    from diffinf_ray.run_root import RunRoot
    from diffinf_ray.stages.lossnets import run_lossnets

    spec = sf.SynthFacesSpec(task="age", resolution=32, seed=0, num_identities=12)
    rows = sf.generate_batch(spec, np.arange(48))
    (tmp_path / "manifest").mkdir(parents=True)
    pq.write_table(pa.table({k: rows[k] for k in ("sample_id", "split", "image", "identity")}),
                   tmp_path / "manifest" / "part-0.parquet")
    overrides = [f"run.root={tmp_path}", "lossnets.identity_epochs=1"]
    cfg = load_config("jobs/configs/tiny.yaml", overrides)
    assert run_lossnets(cfg, RunRoot(str(tmp_path)))["parsing"] is None
    with pytest.raises(ConfigError, match="edit.loss_terms.struct=0"):
        load_edit_losses(cfg, RunRoot(str(tmp_path)))
    cfg = load_config("jobs/configs/tiny.yaml", [*overrides, "edit.loss_terms.struct=0"])
    losses, _ = load_edit_losses(cfg, RunRoot(str(tmp_path)))
    assert losses.parsing is None and losses.missing() == []
