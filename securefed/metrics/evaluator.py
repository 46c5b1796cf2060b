"""Sample-quality evaluation of a generator against the real holdout split.

:class:`SampleEvaluator` is built once per experiment: it trains (or loads from cache) the domain
:class:`~securefed.metrics.classifier.FeatureNet` on the *member* split, reports its accuracy on the
*holdout* split, and embeds the holdout split once. Each :meth:`SampleEvaluator.evaluate` call
then embeds a batch of generated images and reports

- FID (Heusel et al. 2017) against the holdout split, in the feature-net embedding; the holdout
  split is never used to train the generator, so FID does not reward memorising members;
- k-NN precision/recall (Kynkäänniemi et al. 2019) against a seeded holdout subset of the same
  size as the sample batch (both metrics depend on the set sizes);
- the histogram of predicted classes and the fraction of classes covered (mode collapse);
- optionally Inception-v3 FID, when ``evaluation.inception_weights`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from securefed.config import EvaluationConfig
from securefed.metrics.classifier import load_or_train_feature_net
from securefed.metrics.fid import make_fid_metric, make_inception_fid_metric, to_inception_uint8
from securefed.metrics.precision_recall import class_coverage, knn_precision_recall, knn_radii

__all__ = ["QualityReport", "SampleEvaluator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityReport:
    """Quality of one batch of generated images.

    Attributes:
        fid: FID against the holdout split in the feature-net embedding (lower is better).
        precision: k-NN precision in ``[0, 1]`` (fidelity).
        recall: k-NN recall in ``[0, 1]`` (diversity).
        class_histogram: ``[C]`` counts of the feature net's predicted class of each sample.
        class_coverage: fraction of classes predicted at least once.
        feature_net_accuracy: the feature net's holdout accuracy (how much to trust the above).
        inception_fid: Inception-v3 FID against the holdout split, or None when not configured.
    """

    fid: float
    precision: float
    recall: float
    class_histogram: list[int]
    class_coverage: float
    feature_net_accuracy: float
    inception_fid: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        out = dataclasses.asdict(self)
        out["class_histogram"] = [int(v) for v in self.class_histogram]
        return out


def _check_images(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a [N, C, H, W] tensor, got {shape}")


class SampleEvaluator:
    """Scores generated images against the real holdout split (see the module docstring).

    Args:
        members_x: ``[N, C, H, W]`` member images in ``[-1, 1]`` (trains the feature net).
        members_y: ``[N]`` int64 member labels.
        holdout_x: ``[M, C, H, W]`` holdout images (the FID / precision-recall reference).
        holdout_y: ``[M]`` holdout labels (feature-net test accuracy).
        num_classes: number of classes.
        dataset_fingerprint: identifies the data (feature-net cache key).
        cfg: uses ``feature_net_epochs``, ``pr_k`` and ``inception_weights``.
        cache_dir: where the trained feature net is cached.
        seed: seeds the feature-net training and the precision/recall reference subsets.
        device: where the networks run.

    Raises:
        ValueError: mismatched shapes or a holdout set too small for ``pr_k``.
        FileNotFoundError, ModuleNotFoundError: ``inception_weights`` is set but the file or
            ``torch-fidelity`` is missing (raised here, not at the first evaluation).
    """

    def __init__(
        self,
        members_x: Tensor,
        members_y: Tensor,
        holdout_x: Tensor,
        holdout_y: Tensor,
        num_classes: int,
        *,
        dataset_fingerprint: str,
        cfg: EvaluationConfig,
        cache_dir: Path,
        seed: int,
        device: str | torch.device,
        batch_size: int = 256,
    ) -> None:
        _check_images(members_x, "SampleEvaluator: members_x")
        _check_images(holdout_x, "SampleEvaluator: holdout_x")
        if members_x.shape[1:] != holdout_x.shape[1:]:
            raise ValueError(
                f"SampleEvaluator: member images {tuple(members_x.shape[1:])} and holdout images "
                f"{tuple(holdout_x.shape[1:])} differ in shape"
            )
        if len(holdout_x) < max(2, cfg.pr_k + 1):
            raise ValueError(
                f"SampleEvaluator: the holdout split has {len(holdout_x)} images; FID needs >= 2 "
                f"and precision/recall with evaluation.pr_k={cfg.pr_k} needs > {cfg.pr_k}"
            )
        self.cfg = cfg
        self.num_classes = num_classes
        self.image_shape = tuple(holdout_x.shape[1:])
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed = seed

        self.feature_net, self.feature_net_accuracy = load_or_train_feature_net(
            members_x,
            members_y,
            holdout_x,
            holdout_y,
            num_classes,
            dataset_fingerprint=dataset_fingerprint,
            cache_dir=Path(cache_dir),
            epochs=cfg.feature_net_epochs,
            seed=seed,
            device=self.device,
        )
        self.feature_net.eval()
        logger.info(
            "evaluation feature net: holdout accuracy %.4f (%d classes, %d member images)",
            self.feature_net_accuracy,
            num_classes,
            len(members_x),
        )
        if self.feature_net_accuracy < 0.5:
            logger.warning(
                "evaluation feature net holdout accuracy is only %.3f: FID/precision/recall in "
                "its embedding are of limited meaning (raise evaluation.feature_net_epochs?)",
                self.feature_net_accuracy,
            )

        # Holdout statistics, computed once.
        self._fid = make_fid_metric(self.feature_net, reset_real_features=False, device=self.device)
        for i in range(0, len(holdout_x), batch_size):
            self._fid.update(holdout_x[i : i + batch_size].to(self.device), real=True)
        self._holdout_feats, _ = self._embed(holdout_x)
        self._pr_refs: dict[int, tuple[Tensor, np.ndarray]] = {}

        self._inception = None
        if cfg.inception_weights is not None:
            self._inception = make_inception_fid_metric(
                cfg.inception_weights, reset_real_features=False, device=self.device
            )
            for i in range(0, len(holdout_x), 64):
                self._inception.update(
                    to_inception_uint8(holdout_x[i : i + 64]).to(self.device), real=True
                )

    @torch.no_grad()
    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[N, F]`` (float64, CPU) and predicted classes ``[N]`` of images ``x``."""
        feats, preds = [], []
        for i in range(0, len(x), self.batch_size):
            xb = x[i : i + self.batch_size].to(self.device).float()
            f, logits = self.feature_net.features_and_logits(xb)
            feats.append(f.double().cpu())
            preds.append(logits.argmax(dim=1).cpu())
        return torch.cat(feats), torch.cat(preds)

    def _pr_reference(self, n: int) -> tuple[Tensor, np.ndarray]:
        """Seeded holdout subset of ``min(n, M)`` features and its k-NN radii (cached per n)."""
        m = min(n, len(self._holdout_feats))
        if m not in self._pr_refs:
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(self._holdout_feats), generator=gen)[:m]
            ref = self._holdout_feats[idx]
            self._pr_refs[m] = (ref, knn_radii(ref, self.cfg.pr_k))
        return self._pr_refs[m]

    def evaluate(self, samples: Tensor) -> QualityReport:
        """Score generated images.

        Args:
            samples: ``[S, C, H, W]`` generated images, nominally in ``[-1, 1]`` (values outside
                are clamped); ``S > evaluation.pr_k``. Typically ``evaluation.num_fid_samples``.

        Returns:
            The :class:`QualityReport`.

        Raises:
            ValueError: wrong shape, too few samples, or non-finite values (a diverged model).
        """
        _check_images(samples, "SampleEvaluator.evaluate: samples")
        if tuple(samples.shape[1:]) != self.image_shape:
            raise ValueError(
                f"SampleEvaluator.evaluate: samples are {tuple(samples.shape[1:])}, the data "
                f"is {self.image_shape}"
            )
        if len(samples) <= self.cfg.pr_k or len(samples) < 2:
            raise ValueError(
                f"SampleEvaluator.evaluate: got {len(samples)} samples; need more than "
                f"evaluation.pr_k={self.cfg.pr_k} (and at least 2 for FID)"
            )
        if not torch.isfinite(samples).all():
            raise ValueError(
                "SampleEvaluator.evaluate: samples contain NaN or inf (the model diverged?)"
            )
        samples = samples.detach().float().clamp(-1.0, 1.0)

        self._fid.reset()  # keeps the holdout statistics
        for i in range(0, len(samples), self.batch_size):
            self._fid.update(samples[i : i + self.batch_size].to(self.device), real=False)
        fid = float(self._fid.compute().item())

        feats, preds = self._embed(samples)
        ref, ref_radii = self._pr_reference(len(samples))
        precision, recall = knn_precision_recall(ref, feats, self.cfg.pr_k, real_radii=ref_radii)
        hist, coverage = class_coverage(preds.numpy(), self.num_classes)

        inception_fid = None
        if self._inception is not None:
            self._inception.reset()
            for i in range(0, len(samples), 64):
                self._inception.update(
                    to_inception_uint8(samples[i : i + 64]).to(self.device), real=False
                )
            inception_fid = float(self._inception.compute().item())

        return QualityReport(
            fid=fid,
            precision=precision,
            recall=recall,
            class_histogram=[int(v) for v in hist],
            class_coverage=coverage,
            feature_net_accuracy=float(self.feature_net_accuracy),
            inception_fid=inception_fid,
        )
