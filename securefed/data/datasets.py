"""Real image datasets, loaded offline into one uniform in-memory form.

Every dataset is an :class:`ImageDataset` whose ``images`` are float32 ``[N, C, H, W]`` in
``[-1, 1]`` and whose ``labels`` are int64 ``[N]`` in ``[0, num_classes)``. :func:`load_dataset`
reads ``DataConfig.name`` with its loader (one module per format under
:mod:`securefed.data.loaders`, which lists the supported names and the files each expects;
nothing is ever downloaded) and applies the uniform post-processing: scaling to ``[-1, 1]``,
channel conversion, resizing and the stratified ``max_examples`` subset. A missing or malformed
file raises :class:`DatasetError` naming the path that was expected and how to obtain it.

The member/holdout split is ours (:func:`split_member_holdout`), not the original train/test one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from securefed.config import DataConfig
from securefed.data.loaders import LOADERS
from securefed.data.loaders.base import DatasetError, _resize
from securefed.data.loaders.mnist5k import uci_digits_layout

__all__ = [
    "DatasetError",
    "ImageDataset",
    "load_dataset",
    "split_member_holdout",
    "uci_digits_layout",
]


# --------------------------------------------------------------------------------------------
# The in-memory dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image dataset held in memory.

    Attributes:
        images: float32 ``[N, C, H, W]`` in ``[-1, 1]``.
        labels: int64 ``[N]`` in ``[0, num_classes)``.
        num_classes: number of classes ``C`` (classes may be absent from a subset).
        name: the dataset name (``DataConfig.name``).
        class_names: ``num_classes`` human-readable class names.
        sites: int64 ``[N]`` site index per example (``image_folder`` only, else ``None``).
        site_names: names of the sites, indexed by ``sites`` (empty when ``sites`` is ``None``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...]
    sites: torch.Tensor | None = None
    site_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        imgs, labels = self.images, self.labels
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4 or imgs.dtype != torch.float32:
            raise DatasetError(
                f"ImageDataset.images: must be a float32 tensor [N, C, H, W], got {_describe(imgs)}"
            )
        n = imgs.shape[0]
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype != torch.int64
            or labels.shape != (n,)
        ):
            raise DatasetError(
                f"ImageDataset.labels: must be an int64 tensor [N] with N={n} (one label per "
                f"image), got {_describe(labels)}"
            )
        if self.num_classes < 1:
            raise DatasetError(f"ImageDataset.num_classes: must be >= 1, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            raise DatasetError(
                f"ImageDataset.class_names: needs {self.num_classes} names (num_classes), got "
                f"{len(self.class_names)}"
            )
        if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DatasetError(
                f"ImageDataset.labels: must lie in [0, {self.num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if self.sites is None:
            if self.site_names:
                raise DatasetError("ImageDataset.site_names: given without a sites tensor")
        else:
            sites = self.sites
            if (
                not isinstance(sites, torch.Tensor)
                or sites.dtype != torch.int64
                or sites.shape != (n,)
            ):
                raise DatasetError(
                    f"ImageDataset.sites: must be an int64 tensor [N] with N={n}, got "
                    f"{_describe(sites)}"
                )
            if n and (int(sites.min()) < 0 or int(sites.max()) >= len(self.site_names)):
                raise DatasetError(
                    f"ImageDataset.sites: must lie in [0, {len(self.site_names)}) "
                    f"(one entry of site_names per site), got range "
                    f"[{int(sites.min())}, {int(sites.max())}]"
                )

    def __repr__(self) -> str:
        sites = "" if self.sites is None else f", sites={len(self.site_names)}"
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}{sites})"
        )

    def __len__(self) -> int:
        """Number of examples ``N``."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, index: np.ndarray | torch.Tensor) -> ImageDataset:
        """The examples at ``index`` (int indices ``[M]`` or a bool mask ``[N]``), sites kept."""
        idx = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DatasetError(
                    f"ImageDataset.subset: a bool mask must have shape [{len(self)}], got "
                    f"{list(idx.shape)}"
                )
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.int64)
        elif idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise DatasetError(
                f"ImageDataset.subset: index must hold integers or bools, got {idx.dtype}"
            )
        idx = idx.to(torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DatasetError(
                f"ImageDataset.subset: index out of range for a dataset of {len(self)} examples "
                f"(got range [{int(idx.min())}, {int(idx.max())}])"
            )
        return ImageDataset(
            images=self.images[idx].contiguous(),
            labels=self.labels[idx].contiguous(),
            num_classes=self.num_classes,
            name=self.name,
            class_names=self.class_names,
            sites=None if self.sites is None else self.sites[idx].contiguous(),
            site_names=self.site_names,
        )

    def fingerprint(self) -> str:
        """SHA-256 hex digest of name, shape, image bytes, labels (and sites when set).

        Stable across runs and machines: values are hashed in a fixed little-endian layout.
        """
        h = hashlib.sha256()
        h.update(self.name.encode("utf-8"))
        h.update(np.asarray(self.images.shape, dtype="<i8").tobytes())
        h.update(self.images.detach().cpu().contiguous().numpy().astype("<f4").tobytes())
        h.update(self.labels.detach().cpu().numpy().astype("<i8").tobytes())
        if self.sites is not None:
            h.update(b"sites")
            h.update(self.sites.detach().cpu().numpy().astype("<i8").tobytes())
        return h.hexdigest()


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of dtype {x.dtype} and shape {list(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------
# Uniform post-processing (stratified subsets, load, split)
# --------------------------------------------------------------------------------------------


def _group_keys(labels: np.ndarray, sites: np.ndarray | None) -> np.ndarray:
    """One int64 stratum id per example: the label, or the (site, label) pair."""
    if sites is None:
        return labels.astype(np.int64)
    return sites.astype(np.int64) * (int(labels.max(initial=0)) + 1) + labels


def _stratified_take(groups: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``k`` examples drawn so each stratum gets ``round(k * n_g / N)`` +-1.

    Quotas use largest remainders (random tie-break); members of a stratum are chosen at random.
    """
    n = len(groups)
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    quota = counts * (k / n)
    take = np.floor(quota).astype(np.int64)
    rest = k - int(take.sum())
    if rest > 0:
        frac = quota - take
        order = np.lexsort((rng.random(len(uniq)), -frac))
        order = order[take[order] < counts[order]]
        take[order[:rest]] += 1
    perm = rng.permutation(n)
    by_group = perm[np.argsort(inverse[perm], kind="stable")]  # random order within stratum
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    chosen = [by_group[s : s + t] for s, t in zip(starts, take, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load the dataset described by ``cfg`` from local files (never downloads).

    Returns images float32 ``[N, C, H, W]`` in ``[-1, 1]`` and labels int64 ``[N]``; ``C`` is
    ``cfg.channels`` when set (3->1 by ITU-R 601 luminance, 1->3 by repetition) and ``H = W =
    cfg.image_size`` when set (bilinear, antialiased). With ``cfg.max_examples`` a label- (and
    site-) stratified random subset seeded by ``cfg.split_seed`` is kept, in original order.

    Raises:
        DatasetError: files are missing or malformed; the message names the expected path.
    """
    raw = LOADERS[cfg.name](cfg)
    labels = np.asarray(raw.labels, dtype=np.int64)
    images = raw.images
    sites = raw.sites
    n = len(labels)
    if n == 0:
        raise DatasetError(f"data.name: dataset {cfg.name!r} at {cfg.root} holds no examples")
    if cfg.max_examples is not None and cfg.max_examples < n:
        rng = np.random.default_rng(cfg.split_seed)
        keep = _stratified_take(_group_keys(labels, sites), cfg.max_examples, rng)
        images, labels = images[keep], labels[keep]
        sites = None if sites is None else sites[keep]
    x = torch.as_tensor(np.ascontiguousarray(images)).to(torch.float32)
    x = x.mul_(2.0 / raw.scale).sub_(1.0)
    if cfg.channels is not None and x.shape[1] != cfg.channels:
        if cfg.channels == 1:
            if x.shape[1] != 3:
                raise DatasetError(
                    f"data.channels: cannot convert {x.shape[1]}-channel images to grayscale"
                )
            w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        else:
            x = x.expand(-1, 3, -1, -1).contiguous()
    if cfg.image_size is not None and tuple(x.shape[2:]) != (cfg.image_size, cfg.image_size):
        x = _resize(x, cfg.image_size)
    x = x.clamp_(-1.0, 1.0).contiguous()
    return ImageDataset(
        images=x,
        labels=torch.from_numpy(np.ascontiguousarray(labels)),
        num_classes=len(raw.class_names),
        name=cfg.name,
        class_names=raw.class_names,
        sites=None if sites is None else torch.from_numpy(np.ascontiguousarray(sites)),
        site_names=raw.site_names if sites is not None else (),
    )


def split_member_holdout(
    ds: ImageDataset, holdout_fraction: float, seed: int
) -> tuple[ImageDataset, ImageDataset]:
    """Split ``ds`` into (members, holdout) with a fixed, seeded, stratified draw.

    Holdout size is ``round(holdout_fraction * N)`` clipped to ``[1, N - 1]``; each label (and
    each (site, label) pair when ``ds.sites`` is set) contributes within one example of its
    share. Every site keeps at least one member. Deterministic in ``(ds, holdout_fraction,
    seed)``; the two parts are disjoint, cover ``ds`` and keep the original order.

    Raises:
        DatasetError: ``holdout_fraction`` not in (0, 1) or fewer than 2 examples.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DatasetError(f"data.holdout_fraction: must be in (0, 1), got {holdout_fraction}")
    n = len(ds)
    if n < 2:
        raise DatasetError(
            f"data.holdout_fraction: dataset {ds.name!r} has {n} example(s); need at least 2 "
            "for a non-empty member and holdout set (raise data.max_examples or add data)"
        )
    labels = ds.labels.cpu().numpy()
    sites = None if ds.sites is None else ds.sites.cpu().numpy()
    k = min(max(round(holdout_fraction * n), 1), n - 1)
    rng = np.random.default_rng(seed)
    hold = np.zeros(n, dtype=bool)
    hold[_stratified_take(_group_keys(labels, sites), k, rng)] = True
    if sites is not None:
        present = np.unique(sites)
        if n <= len(present):
            raise DatasetError(
                f"data.holdout_fraction: {n} examples over {len(present)} sites cannot give "
                "every site a member and still leave a holdout example; add images (or raise "
                "data.max_examples)"
            )
        # Every site must keep at least one member: hand one example back where needed, then
        # refill the holdout to k from the sites with the most members.
        for s in present:
            in_site = sites == s
            if hold[in_site].all():
                hold[rng.choice(np.flatnonzero(in_site))] = False
        while hold.sum() < k:
            member_counts = np.bincount(sites[~hold], minlength=int(sites.max()) + 1)
            donor = int(np.argmax(member_counts))
            if member_counts[donor] < 2:
                break
            hold[rng.choice(np.flatnonzero((sites == donor) & ~hold))] = True
    if not hold.any() or hold.all():
        raise DatasetError(
            f"data.holdout_fraction: {holdout_fraction} leaves an empty member or holdout set "
            f"for {n} examples"
        )
    idx = np.arange(n)
    return ds.subset(idx[~hold]), ds.subset(idx[hold])
