"""The domain feature network used in place of Inception-v3.

FID (Heusel et al. 2017) and k-NN precision/recall (Kynkäänniemi et al. 2019) need an embedding
of images. The standard Inception-v3 embedding (Szegedy et al. 2016) is trained on ImageNet and
its weights cannot be fetched offline, and it is a poor fit for 8x8-32x32 grayscale images
anyway. Following common practice for small domains (the "classifier FID" used for MNIST-like
data), we train a small CNN classifier on the *member* split of the real data and use its
globally pooled last convolutional layer as the feature space. The holdout split is only used
to report its test accuracy, which tells how meaningful the embedding is.

Images are float32 ``[N, C, H, W]`` in ``[-1, 1]``; labels are int64 ``[N]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from io import BytesIO
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from securefed.io import atomic_write_bytes

__all__ = [
    "ARCH_VERSION",
    "FeatureNet",
    "classification_accuracy",
    "feature_net_cache_key",
    "load_or_train_feature_net",
    "predict_classes",
    "train_feature_net",
]

logger = logging.getLogger(__name__)

#: Bump whenever :class:`FeatureNet` or :func:`train_feature_net` changes in a way that changes
#: the trained weights; it is part of the cache key, so old cache files are simply not found.
ARCH_VERSION = 1


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1  # pragma: no cover - unreachable, 1 divides everything


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(c_out), c_out),
            nn.SiLU(),
        )


class FeatureNet(nn.Module):
    """Small GroupNorm CNN classifier whose pooled last conv layer is the evaluation embedding.

    Layout (width ``w``): a stride-1 stem to ``w`` channels, stride-2 stages doubling the width
    (capped at ``4w``) until the map is at most 4x4 (8x8 input: 1 stage, 16x16: 2, 28x28 and
    32x32: 3), and a stride-1 block to ``num_features`` channels. Each block is
    ``Conv3x3 -> GroupNorm -> SiLU``; GroupNorm (no BatchNorm) makes train and eval mode equal.

    - :meth:`features`: global average pool of the last block, ``[B, num_features]`` (the
      analogue of Inception-v3's pool3 used by FID).
    - :meth:`forward`: logits from a head that keeps coarse layout
      (``AdaptiveAvgPool2d(2) -> Linear -> SiLU -> Linear``).

    Why not the head's hidden layer as the embedding: on digits, that layer (trained to be
    class-discriminative) mapped ~25% of uniform-noise images inside the real k-NN manifold
    (precision 0.24) and separated noise from real data by a factor of ~15 in FID; the pooled
    conv features give precision ~0.05 for noise and a factor of ~30, and separate blurred or
    mode-collapsed samples 2-3x better too.

    Args:
        in_channels: ``C`` of the input images (1 or 3).
        image_size: ``H = W`` of the input images (only sets the number of stride-2 stages; any
            size works thanks to the adaptive pooling).
        num_classes: number of classes of the logits.
        width: base channel count ``w``.
        num_features: embedding dimension (channels of the last block).
        hidden: width of the classification head's hidden layer.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        width: int = 32,
        num_features: int = 128,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        if min(in_channels, image_size, width, num_features, hidden) < 1 or num_classes < 2:
            raise ValueError(
                "FeatureNet: need num_classes >= 2 and every other size >= 1; got "
                f"in_channels={in_channels}, image_size={image_size}, num_classes={num_classes}, "
                f"width={width}, num_features={num_features}, hidden={hidden}"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.width = width
        self.num_features = num_features
        self.hidden = hidden

        n_down = max(1, math.ceil(math.log2(image_size / 4))) if image_size > 4 else 0
        layers: list[nn.Module] = [_ConvBlock(in_channels, width, 1)]
        c = width
        for i in range(n_down):
            c_next = width * min(2 ** (i + 1), 4)
            layers.append(_ConvBlock(c, c_next, 2))
            c = c_next
        layers.append(_ConvBlock(c, num_features, 1))
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * num_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, num_classes),
        )

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FeatureNet: expected images [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Embedding ``[B, num_features]`` of images ``x`` ``[B, C, H, W]`` in ``[-1, 1]``."""
        self._check_input(x)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of images ``x`` ``[B, C, H, W]``."""
        self._check_input(x)
        return self.head(self.body(x))

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features [B, num_features], logits [B, num_classes])`` in one pass."""
        self._check_input(x)
        h = self.body(x)
        return h.mean(dim=(2, 3)), self.head(h)


def _net_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def predict_classes(net: FeatureNet, x: Tensor, batch_size: int = 512) -> Tensor:
    """Arg-max class ``[N]`` (int64, on CPU) of images ``x`` ``[N, C, H, W]``."""
    was_training = net.training
    net.eval()
    dev = _net_device(net)
    out = [
        net(x[i : i + batch_size].to(dev)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)
    ]
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def classification_accuracy(net: FeatureNet, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``net`` on images ``x`` ``[N, C, H, W]`` with labels ``y`` ``[N]``."""
    if len(x) != len(y):
        raise ValueError(f"classification_accuracy: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("classification_accuracy: empty evaluation set")
    pred = predict_classes(net, x)
    return float((pred == y.cpu().long()).double().mean().item())


def _random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (replicate padding)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # [B, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _check_data(x: Tensor, y: Tensor, name: str, num_classes: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name}: empty")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes - 1}], "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def train_feature_net(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    device: str | torch.device,
    batch_size: int = 128,
) -> tuple[FeatureNet, float]:
    """Train a :class:`FeatureNet` classifier and report its test accuracy.

    AdamW (lr 2e-3, weight decay 1e-4) with a cosine schedule, label smoothing 0.1, and random
    translations of up to ``max(1, H // 16)`` pixels as the only augmentation (no flips: digits
    and letters are not flip-invariant). Everything random (initialisation, shuffling,
    augmentation) derives from ``seed`` without touching the global RNG state, so on CPU the
    result is bit-for-bit reproducible.

    Args:
        train_x: ``[N, C, H, W]`` float images in ``[-1, 1]`` (the member split).
        train_y: ``[N]`` int64 labels.
        test_x: ``[M, C, H, W]`` held-out images (the holdout split).
        test_y: ``[M]`` labels.
        num_classes: number of classes.
        epochs: passes over ``train_x``.
        seed: seed of every random draw.
        device: where to train.
        batch_size: mini-batch size.

    Returns:
        The trained net (in eval mode, on ``device``) and its top-1 accuracy on the test set.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"train_feature_net: epochs and batch_size must be >= 1, got "
            f"epochs={epochs}, batch_size={batch_size}"
        )
    _check_data(train_x, train_y, "train_feature_net: train set", num_classes)
    _check_data(test_x, test_y, "train_feature_net: test set", num_classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"train_feature_net: train images {tuple(train_x.shape[1:])} and test images "
            f"{tuple(test_x.shape[1:])} differ in shape"
        )
    dev = torch.device(device)
    _, c, h, w = train_x.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(c, max(h, w), num_classes).to(dev)
    gen = torch.Generator().manual_seed(seed)

    x_all = train_x.float().to(dev)
    y_all = train_y.long().to(dev)
    n = len(x_all)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )
    max_shift = max(1, min(h, w) // 16)
    t0 = time.perf_counter()
    net.train()
    for _epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = _random_shift(x_all[idx], max_shift, gen)
            loss = F.cross_entropy(net(xb), y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    acc = classification_accuracy(net, test_x.float(), test_y)
    logger.info(
        "feature net: %d epochs on %d images in %.1fs, test accuracy %.4f",
        epochs,
        n,
        time.perf_counter() - t0,
        acc,
    )
    return net, acc


def feature_net_cache_key(dataset_fingerprint: str, epochs: int, seed: int) -> str:
    """sha256 hex digest of (fingerprint, epochs, seed, :data:`ARCH_VERSION`)."""
    payload = json.dumps(
        {
            "fingerprint": dataset_fingerprint,
            "epochs": int(epochs),
            "seed": int(seed),
            "arch_version": ARCH_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _load_cached(
    path: Path, in_channels: int, image_size: int, num_classes: int, device: torch.device
) -> tuple[FeatureNet, float]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict):
        raise ValueError("not a feature-net checkpoint")
    expected = {
        "arch_version": ARCH_VERSION,
        "in_channels": in_channels,
        "image_size": image_size,
        "num_classes": num_classes,
    }
    for k, v in expected.items():
        if blob.get(k) != v:
            raise ValueError(f"{k} is {blob.get(k)!r}, expected {v!r}")
    net = FeatureNet(
        in_channels,
        image_size,
        num_classes,
        width=int(blob["width"]),
        num_features=int(blob["num_features"]),
        hidden=int(blob["hidden"]),
    )
    net.load_state_dict(blob["state_dict"])  # strict: raises on missing/unexpected/shape
    accuracy = float(blob["accuracy"])
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"stored accuracy {accuracy} is not in [0, 1]")
    return net.to(device).eval(), accuracy


def _save_atomic(path: Path, blob: dict) -> None:
    """``torch.save`` through the project's one atomic writer (tmp + fsync + rename)."""
    buf = BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_or_train_feature_net(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    dataset_fingerprint: str,
    cache_dir: Path,
    epochs: int,
    seed: int,
    device: str | torch.device,
) -> tuple[FeatureNet, float]:
    """Return the cached feature net for this data/epochs/seed, training and caching it if needed.

    The cache file is ``<cache_dir>/featnet-<key>.pt`` with ``key`` from
    :func:`feature_net_cache_key`. It holds the CPU ``state_dict``, the test accuracy and the
    shapes, is written atomically (temporary file + ``os.replace``) and read with
    ``torch.load(weights_only=True)``. A corrupt or mismatched file triggers a warning and a
    retrain that overwrites it.

    Args: as :func:`train_feature_net`, plus ``dataset_fingerprint`` (identifies the member and
        holdout data) and ``cache_dir``.

    Returns:
        The net (eval mode, on ``device``) and its test accuracy.
    """
    dev = torch.device(device)
    _, c, h, w = train_x.shape
    image_size = max(h, w)
    path = (
        Path(cache_dir) / f"featnet-{feature_net_cache_key(dataset_fingerprint, epochs, seed)}.pt"
    )
    if path.is_file():
        try:
            net, acc = _load_cached(path, c, image_size, num_classes, dev)
        except Exception as exc:
            msg = f"feature-net cache {path} is unusable ({type(exc).__name__}: {exc}); retraining"
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
            logger.info("feature net loaded from cache %s (test accuracy %.4f)", path, acc)
            return net, acc
    net, acc = train_feature_net(
        train_x, train_y, test_x, test_y, num_classes, epochs=epochs, seed=seed, device=dev
    )
    blob = {
        "arch_version": ARCH_VERSION,
        "in_channels": c,
        "image_size": image_size,
        "num_classes": num_classes,
        "width": net.width,
        "num_features": net.num_features,
        "hidden": net.hidden,
        "accuracy": float(acc),
        "epochs": int(epochs),
        "seed": int(seed),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    _save_atomic(path, blob)
    return net, acc
