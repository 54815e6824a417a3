"""F_id, the identity network of L_id = 1 - cos(F_id(x), F_id(x_ref)) (METHOD.md stage 6).

Contract of every identity net here: x (B, 3, H, W) RGB in [-1, 1] -> (B, D) embedding,
differentiable w.r.t. x (the networks themselves are frozen by `edit.losses`).

- `load_arcface_onnx(uri, sha256)`: insightface's ArcFace recognition ONNX (e.g. `w600k_r50.onnx`
  of the buffalo_l pack: input (N, 3, 112, 112), output (N, 512)), sha256-checked, converted to
  PyTorch with onnx2torch and wrapped in `ArcFaceIdentity`, which crops our FFHQ-aligned images
  to ArcFace's 112 px template with a fixed, differentiable similarity warp.
- `IdentityEmbedder`: a small CNN for when no ArcFace file exists (e.g. synthfaces), trained by
  `train_identity_embedder` with a CosFace head on an `identity` column and judged by face
  verification AUROC on held-out identities; L2-normalised (B, embed_dim) output.
- `save_identity_embedder` / `load_identity_embedder`: safetensors + config.json in a local
  folder or an s3:// prefix, the weights' sha256 recorded in the config and checked on load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffinf_ray.diffae.weights import (
    load_state_strict,
    read_weights_folder,
    write_weights_folder,
)
from diffinf_ray.models.weights import WeightsError, read_verified_bytes
from diffinf_ray.storage import Location, StorageOptions

# -- ArcFace alignment --------------------------------------------------------------------------

ARCFACE_SIZE = 112
# insightface `utils/face_align.py` `arcface_dst`: where ArcFace models expect the five landmarks
# (left eye, right eye, nose tip, left and right mouth corner, in image order) in a 112 px crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]])
# The same five landmarks in a 512 px FFHQ-aligned image: the "standard 5 landmarks for FFHQ faces"
# of facexlib's `FaceRestoreHelper.face_template` (used by GFPGAN/CodeFormer to align faces the way
# the FFHQ script `recreate_aligned_images` does). FFHQ-aligned images of any size share them up
# to scale, so one fixed warp aligns every image of an FFHQ-style data set.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]])


def _to_normalised(points: np.ndarray, size: int) -> np.ndarray:
    """Pixel coordinates (cv2 convention: pixel i's centre at i) -> grid_sample's [-1, 1]
    coordinates with align_corners=False (the image spans [-1, 1] edge to edge)."""
    return (2.0 * points + 1.0) / size - 1.0


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The (2, 3) similarity (rotation, uniform scale, translation) mapping `src` points onto
    `dst` in the least-squares sense (Umeyama 1991; what skimage's SimilarityTransform.estimate
    and so insightface's `estimate_norm` compute)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


# FFHQ frame -> ArcFace crop in normalised coordinates: scale ~1.335, rotation ~0, i.e. the crop
# is the central ~75% of the FFHQ frame, shifted down by ~1% of it (residual ~2 px at 112 px).
FFHQ_TO_ARCFACE = similarity_transform(_to_normalised(FFHQ_TEMPLATE_512, 512),
                                       _to_normalised(ARCFACE_TEMPLATE_112, ARCFACE_SIZE))


def _inverse(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def align_ffhq_to_arcface(x: torch.Tensor) -> torch.Tensor:
    """FFHQ-aligned (B, 3, H, W) images in [-1, 1] -> (B, 3, 112, 112) ArcFace crops, in [-1, 1].

    A fixed similarity warp (`FFHQ_TO_ARCFACE`) with bilinear `grid_sample`, so gradients reach
    x. Large inputs are first resized (antialiased) to where the crop samples about one source
    pixel per output pixel, to avoid aliasing. Outside the frame is black (-1), as cv2's
    `warpAffine(borderValue=0)` in insightface's `norm_crop`.
    """
    scale = float(np.hypot(*FFHQ_TO_ARCFACE[0, :2]))
    native = int(round(ARCFACE_SIZE * scale))  # input size where the crop is 1:1 (~150 px)
    if min(x.shape[-2:]) > native:
        x = F.interpolate(x, size=(native, native), mode="bilinear", align_corners=False,
                          antialias=True)
    theta = torch.as_tensor(_inverse(FFHQ_TO_ARCFACE), dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), [x.shape[0], 3, ARCFACE_SIZE,
                                                          ARCFACE_SIZE], align_corners=False)
    # grid_sample pads with 0; shift so the padding is -1 (black) in our range
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) - 1.0


class ArcFaceIdentity(nn.Module):
    """An insightface ArcFace recognition net on our images: x (B, 3, H, W) RGB in [-1, 1],
    FFHQ-aligned -> (B, 512) raw (unnormalised) embedding, as insightface's `get_feat`.

    Input convention of insightface's `ArcFaceONNX.get_feat`: a BGR uint8 crop goes through
    `cv2.dnn.blobFromImages(img, 1/std, (112, 112), (mean,)*3, swapRB=True)`, i.e. the network
    sees RGB, (pixel - mean) / std. With mean = std = 127.5 (ONNX exports of PyTorch models, e.g.
    w600k_r50) that is exactly our [-1, 1] RGB; models converted from mxnet normalise inside the
    graph and take raw pixels (mean 0, std 1). `align=False` skips the crop for images that are
    already 112 px ArcFace crops.
    """

    def __init__(self, net: nn.Module, input_mean: float = 127.5, input_std: float = 127.5,
                 align: bool = True):
        super().__init__()
        self.net = net
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.align = align

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB images -> the network's input blob (B, 3, 112, 112)."""
        crop = align_ffhq_to_arcface(x) if self.align else x
        pixels = (crop + 1.0) * 127.5  # [0, 255] RGB, as the blob before mean/std
        return (pixels - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x)).flatten(1)


def arcface_input_normalisation(model) -> tuple[float, float]:
    """(mean, std) the way insightface's ArcFaceONNX decides it: graphs whose first 8 nodes
    include both a Sub and a Mul (mxnet conversions) normalise internally -> (0, 1); others take
    (pixel - 127.5) / 127.5."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def load_arcface_onnx(path_or_uri: str, sha256: str | None,
                      storage_options: StorageOptions | None = None,
                      align: bool = True) -> ArcFaceIdentity:
    """An insightface ArcFace ONNX file (local path or s3://), sha256-checked before anything is
    parsed, as a frozen `ArcFaceIdentity` in eval mode. Raises WeightsError naming the file when
    it is missing, altered, or not a (N, 3, 112, 112) -> (N, D) recognition model."""
    import onnx
    from onnx2torch import convert

    where = Location(path_or_uri, storage_options).display
    if not sha256:
        raise WeightsError(f"{where}: give the ArcFace file's sha256 (it is checked before loading)")
    data = read_verified_bytes(path_or_uri, sha256, storage_options)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf raises its own DecodeError
        raise WeightsError(f"{where}: not an ONNX model ({err})") from err
    inputs = [i for i in model.graph.input
              if i.name not in {init.name for init in model.graph.initializer}]
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    if len(dims) != 4 or dims[1:] != [3, ARCFACE_SIZE, ARCFACE_SIZE] or len(model.graph.output) != 1:
        raise WeightsError(f"{where}: expected one (N, 3, 112, 112) input and one output "
                           f"(an ArcFace recognition model), got input dims {dims} and "
                           f"{len(model.graph.output)} outputs")
    mean, std = arcface_input_normalisation(model)
    try:
        net = convert(model)
    except Exception as err:  # onnx2torch raises NotImplementedError and others
        raise WeightsError(f"{where}: onnx2torch cannot convert this model ({err})") from err
    return ArcFaceIdentity(net, mean, std, align).eval().requires_grad_(False)


# -- a small embedder trained here --------------------------------------------------------------

FORMAT = "diffinf-identity-embedder/1"
WEIGHTS_FILE = "model.safetensors"


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class IdentityEmbedder(nn.Module):
    """x (B, 3, H, W) in [-1, 1], H, W >= 32 -> (B, embed_dim) unit vectors.

    Images are resized to `input_size` (bilinear, no antialias: cheap and differentiable), then
    per stage a stride-2 and a stride-1 3x3 conv (GroupNorm, so train and eval behave alike and
    batch composition does not matter), global average pool, linear. `feature_maps` gives the
    stage outputs (the perceptual fallback's features).
    """

    def __init__(self, embed_dim: int = 128, channels: Sequence[int] = (32, 64, 128),
                 input_size: int = 64):
        super().__init__()
        self.embed_dim, self.channels, self.input_size = int(embed_dim), tuple(channels), input_size
        stages, c_in = [], 3
        for c in self.channels:
            stages.append(nn.Sequential(_conv_block(c_in, c, 2), _conv_block(c, c, 1)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in, self.embed_dim)

    def config(self) -> dict:
        return {"embed_dim": self.embed_dim, "channels": list(self.channels),
                "input_size": self.input_size}

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"IdentityEmbedder needs images of at least 32 px, got {tuple(x.shape)}")
        h = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=False)
        maps = []
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.feature_maps(x)[-1].mean(dim=(2, 3))
        return F.normalize(self.head(pooled), dim=1)


class CosFaceHead(nn.Module):
    """Large-margin cosine classifier (CosFace, Wang et al. 2018): logits = s * (cos - m * onehot)
    over unit-normalised class weights and embeddings."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 16.0, margin: float = 0.2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
        margin = F.one_hot(labels, cos.shape[1]).to(cos.dtype) * self.margin
        return self.scale * (cos - margin)


def _split_identities(identities: Sequence[str], val_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (train, val) image masks; val holds `val_fraction` of the distinct identities."""
    ids = np.asarray([str(i) for i in identities])
    unique = np.unique(ids)  # sorted: the split does not depend on row order
    n_val = int(round(val_fraction * len(unique))) if len(unique) > 1 else 0
    n_val = min(n_val, len(unique) - 1)
    val_ids = np.random.default_rng(seed).permutation(unique)[:n_val]
    val = np.isin(ids, val_ids)
    return ~val, val


MAX_VERIFICATION_IMAGES = 3000  # all pairs of these: ~4.5M similarities


def verification_auroc(embeddings: torch.Tensor, identities: Sequence[str],
                       seed: int = 0) -> float | None:
    """AUROC of cosine similarity separating same-identity from different-identity pairs, over
    all pairs of the given images (a seeded subset of MAX_VERIFICATION_IMAGES when more); None
    when there are no pairs of one kind."""
    from sklearn.metrics import roc_auc_score

    ids = np.asarray([str(i) for i in identities])
    emb = F.normalize(embeddings.detach().float().cpu(), dim=1)
    if len(ids) > MAX_VERIFICATION_IMAGES:
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), MAX_VERIFICATION_IMAGES,
                                                          replace=False))
        ids, emb = ids[keep], emb[torch.from_numpy(keep)]
    rows, cols = np.triu_indices(len(ids), k=1)
    same = ids[rows] == ids[cols]
    if same.all() or not same.any():
        return None
    sims = (emb @ emb.T).numpy()[rows, cols]
    return float(roc_auc_score(same, sims))


@torch.no_grad()
def _embed_all(model: nn.Module, images: torch.Tensor, batch_size: int,
               device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).cpu()
                      for i in range(0, len(images), batch_size)])


def train_identity_embedder(
    images: torch.Tensor,
    identities: Sequence[str],
    embed_dim: int = 128,
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.2,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
) -> tuple[IdentityEmbedder, dict]:
    """Train an `IdentityEmbedder` on (N, 3, H, W) images in [-1, 1] labelled by `identities`.

    CosFace classification over the training identities (Adam, cosine learning-rate decay,
    random horizontal flips); `val_fraction` of the identities (not images) is held out, and
    the report gives the verification AUROC on their images:
    {verification_auroc (None without both pair kinds), train_identities, val_identities,
    train_images, val_images, final_loss, epochs, seconds}. Deterministic for a seed on one
    machine and thread count; the returned model is frozen, in eval mode, on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(identities):
        raise ValueError(f"expected (N, 3, H, W) images and N identities, got {tuple(images.shape)}"
                         f" and {len(identities)}")
    start = time.perf_counter()
    device = torch.device(device)
    train_mask, val_mask = _split_identities(identities, val_fraction, seed)
    ids = np.asarray([str(i) for i in identities])
    classes, labels = np.unique(ids[train_mask], return_inverse=True)
    x_train = images[torch.from_numpy(train_mask)].float()
    y_train = torch.from_numpy(labels.astype(np.int64))
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        model = IdentityEmbedder(embed_dim).to(device)
        head = CosFaceHead(embed_dim, len(classes)).to(device)
    params = [*model.parameters(), *head.parameters()]
    optimiser = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        flips = torch.rand(len(x_train), generator=gen) < 0.5
        total, count = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = x_train[idx]
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x).to(device)
            loss = F.cross_entropy(head(model(x), y_train[idx].to(device)), y_train[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        loss_value = total / max(count, 1)
        log(f"identity embedder epoch {epoch + 1}/{epochs}: CosFace loss {loss_value:.4f}")
    auroc = None
    if val_mask.any():
        emb = _embed_all(model, images[torch.from_numpy(val_mask)].float(), 256, device)
        auroc = verification_auroc(emb, ids[val_mask], seed)
    report = {
        "verification_auroc": auroc,
        "train_identities": int(len(classes)),
        "val_identities": int(len(np.unique(ids[val_mask]))),
        "train_images": int(train_mask.sum()),
        "val_images": int(val_mask.sum()),
        "final_loss": loss_value,
        "epochs": int(epochs),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log(f"identity embedder: verification AUROC {auroc} on {report['val_identities']} held-out "
        f"identities ({report['seconds']} s)")
    return model.cpu().eval().requires_grad_(False), report


def _folder(location_or_path: str | Location) -> Location:
    if isinstance(location_or_path, Location):
        return location_or_path
    return Location(str(location_or_path))


def save_identity_embedder(model: IdentityEmbedder, location_or_path: str | Location) -> dict:
    """Write <folder>/config.json ({format, config, files: {name: {sha256}}}) and
    <folder>/model.safetensors; returns the config written."""
    return write_weights_folder(_folder(location_or_path), model.state_dict(), FORMAT,
                                model.config(), WEIGHTS_FILE)


def load_identity_embedder(location_or_path: str | Location) -> IdentityEmbedder:
    """The model saved at the folder, frozen, in eval mode (weights' sha256 checked against
    config.json); WeightsError naming the file otherwise."""
    manifest, state, where = read_weights_folder(_folder(location_or_path), FORMAT, WEIGHTS_FILE)
    model = load_state_strict(IdentityEmbedder(**manifest["config"]), state, where)
    return model.eval().requires_grad_(False)
