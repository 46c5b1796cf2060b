"""Fréchet distance between feature distributions (FID, Heusel et al. 2017).

FID fits a Gaussian to the embeddings of real and of generated images and reports the Fréchet
(2-Wasserstein) distance between the two Gaussians (Dowson & Landau 1982)::

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

:func:`compute_fid` runs it through torchmetrics' ``FrechetInceptionDistance`` with the domain
:class:`~securefed.metrics.classifier.FeatureNet` as the embedding; :func:`compute_inception_fid`
uses the classic Inception-v3 pool3 embedding (Szegedy et al. 2016) when its weights and
``torch-fidelity`` are available. :func:`frechet_distance` is an independent numpy/scipy
implementation (as in ``pytorch-fid``, Seitzer 2020) used to cross-check.

Images are float32 ``[N, C, H, W]`` in ``[-1, 1]``.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from securefed.metrics.classifier import FeatureNet

__all__ = [
    "FeatureNetExtractor",
    "compute_fid",
    "compute_inception_fid",
    "frechet_distance",
    "make_fid_metric",
    "make_inception_fid_metric",
    "to_inception_uint8",
]

#: Expected weights: torch-fidelity's port of the TF FID Inception, e.g.
#: ``weights-inception-2015-12-05-6726825d.pth`` from the torch-fidelity GitHub releases.
INCEPTION_WEIGHTS_HINT = (
    "torch-fidelity's 'inception-v3-compat' state dict "
    "(weights-inception-2015-12-05-6726825d.pth, from the torch-fidelity GitHub releases)"
)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (Heusel et al. 2017).

    ``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))``. If the product is
    singular and ``sqrtm`` returns non-finite values, ``eps * I`` is added to both covariances
    (the standard ``pytorch-fid`` offset). Tiny imaginary parts from rounding are dropped (with a
    warning if they are not tiny), and the result is clipped at 0.

    Args:
        mu1: ``[D]`` mean of the first set of features.
        sigma1: ``[D, D]`` covariance of the first set.
        mu2: ``[D]`` mean of the second set.
        sigma2: ``[D, D]`` covariance of the second set.
        eps: diagonal offset used only when the product is singular.

    Returns:
        The squared Fréchet distance (the FID convention: no square root).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            "frechet_distance: expected mu [D] and sigma [D, D] of one D, got "
            f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"frechet_distance: {name} has non-finite entries")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            warnings.warn(
                f"frechet_distance: sqrtm has imaginary component {max_imag:.3g}; "
                "using its real part (covariances may be badly estimated: too few samples?)",
                RuntimeWarning,
                stacklevel=2,
            )
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


class FeatureNetExtractor(nn.Module):
    """torchmetrics ``feature=`` adapter around :meth:`FeatureNet.features`.

    torchmetrics reads ``num_features`` (an int) to size its running sums, then calls the module
    on each batch passed to ``update`` unchanged (for a custom module it neither rescales nor casts
    the images; ``normalize`` only picks the dtype of a probe image when ``num_features`` is
    missing). Input: float ``[B, C, H, W]`` in ``[-1, 1]``; output: float64
    ``[B, num_features]`` so that ``compute()`` also returns float64.
    """

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, num_features]`` (float64) of images ``[B, C, H, W]``."""
        dev = next(self.net.parameters()).device
        with torch.no_grad():
            return self.net.features(x.to(device=dev, dtype=torch.float32)).double()


def make_fid_metric(
    feature_net: FeatureNet, *, reset_real_features: bool = True, device: str | torch.device = "cpu"
) -> FrechetInceptionDistance:
    """A torchmetrics FID metric embedding with ``feature_net`` (put in eval mode).

    With ``reset_real_features=False`` the real statistics survive ``reset()``, so a fixed
    reference set is embedded once and only the fake statistics are recomputed per evaluation.
    """
    feature_net.eval()
    metric = FrechetInceptionDistance(
        feature=FeatureNetExtractor(feature_net),
        reset_real_features=reset_real_features,
        normalize=True,
    )
    return metric.to(torch.device(device))


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a [N, C, H, W] tensor, got {shape}")
    if len(x) < 2:
        raise ValueError(f"{name}: FID needs at least 2 images, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or inf")


def _update_batched(
    metric: FrechetInceptionDistance, x: Tensor, real: bool, batch_size: int, device: torch.device
) -> None:
    for i in range(0, len(x), batch_size):
        metric.update(x[i : i + batch_size].to(device), real=real)


def compute_fid(
    feature_net: FeatureNet,
    real: Tensor,
    fake: Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """FID between ``real`` and ``fake`` in the embedding of ``feature_net``.

    Computed with torchmetrics' ``FrechetInceptionDistance`` (float64 running sums, closed-form
    trace of the matrix square root via eigenvalues). The net is moved to ``device``.

    Args:
        feature_net: the trained domain feature net.
        real: ``[N, C, H, W]`` reference images in ``[-1, 1]`` (N >= 2).
        fake: ``[M, C, H, W]`` generated images in ``[-1, 1]`` (M >= 2).
        batch_size: images per forward pass.
        device: where the features are computed.

    Returns:
        The FID (lower is better; 0 for identical feature statistics).
    """
    _check_images(real, "compute_fid: real")
    _check_images(fake, "compute_fid: fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"compute_fid: real images {tuple(real.shape[1:])} and fake images "
            f"{tuple(fake.shape[1:])} differ in shape"
        )
    dev = torch.device(device)
    feature_net.to(dev)
    metric = make_fid_metric(feature_net, device=dev)
    _update_batched(metric, real, True, batch_size, dev)
    _update_batched(metric, fake, False, batch_size, dev)
    return float(metric.compute().item())


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def to_inception_uint8(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` floats in ``[-1, 1]`` -> ``[N, 3, H, W]`` uint8 in ``[0, 255]``.

    Grayscale (``C = 1``) is repeated to 3 channels. The resize to 299x299 is done inside
    torchmetrics' Inception wrapper (bilinear, antialiased), so it is not done here.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_inception_uint8: expected [N, 1 or 3, H, W], got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def make_inception_fid_metric(
    weights_path: Path | str,
    *,
    reset_real_features: bool = True,
    device: str | torch.device = "cpu",
) -> FrechetInceptionDistance:
    """torchmetrics Inception-v3 (pool3, 2048-d) FID metric loading weights from a local file.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ModuleNotFoundError: ``torch-fidelity`` is not installed.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception FID: weights file {str(path)!r} not found. Download "
            f"{INCEPTION_WEIGHTS_HINT} on a machine with internet access and set "
            "evaluation.inception_weights to its local path (or unset it to skip Inception FID)."
        )
    if not _torch_fidelity_available():
        raise ModuleNotFoundError(
            "Inception FID needs the `torch-fidelity` package (torchmetrics uses it for the "
            "Inception-v3 network): `pip install torch-fidelity` (or `pip install "
            "'torchmetrics[image]'`), or unset evaluation.inception_weights to skip Inception FID."
        )
    metric = FrechetInceptionDistance(
        feature=2048,
        reset_real_features=reset_real_features,
        normalize=False,  # we pass uint8 in [0, 255]
        feature_extractor_weights_path=str(path),
    )
    return metric.to(torch.device(device))


def compute_inception_fid(
    weights_path: Path | str,
    real: Tensor,
    fake: Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> float:
    """Classic Inception-v3 FID (Heusel et al. 2017) between ``real`` and ``fake``.

    Images ``[N, C, H, W]`` in ``[-1, 1]`` are converted with :func:`to_inception_uint8` (3
    channels, uint8) and resized to 299x299 by torchmetrics. Needs ``torch-fidelity`` and a local
    copy of the weights (no download is attempted).

    Raises:
        FileNotFoundError: the weights file is missing.
        ModuleNotFoundError: ``torch-fidelity`` is not installed.
    """
    _check_images(real, "compute_inception_fid: real")
    _check_images(fake, "compute_inception_fid: fake")
    dev = torch.device(device)
    metric = make_inception_fid_metric(weights_path, device=dev)
    _update_batched(metric, to_inception_uint8(real), True, batch_size, dev)
    _update_batched(metric, to_inception_uint8(fake), False, batch_size, dev)
    return float(metric.compute().item())
