"""The site (SuperNode) side: the same trainer, DP ledger and masking client as the simulation.

A site is configured by the SuperNode's ``--node-config`` (never by the coordinator):

=================  ==========================================================================
key                meaning
=================  ==========================================================================
``state-dir``      required. Local folder for the privacy ledger (``privacy_ledger.json``), the
                   DP noise key (``secrets/``), the secure-aggregation round state and the
                   site's private strategy state. Never leaves the site.
``keys-dir``       required. Folder with this site's signing key ``client_<id>.key`` (0600) and
                   the deployment's ``roster.json`` (``securefed keys init``).
``client-id``      this site's id in the roster (required with ``data-path``).
``data-path``      a folder in the ``image_folder`` layout (``<data-path>/<site>/<class>/img``):
                   every image in it is this site's training data.
``partition-id``   rehearsals and tests: load the experiment's dataset, split and partition it
                   exactly as the simulation does, and train on partition ``partition-id``
                   (also the client id unless ``client-id`` is given).
``device``         ``cpu`` (default), ``cuda`` or ``auto``.
``require-dp``     ``true`` (default): refuse an experiment without record-level DP.
``max-epsilon``    refuse an experiment whose ``dp.target_epsilon`` exceeds this value.
``min-threshold``  ``2/3`` (default): refuse a round whose Shamir threshold ``t`` is not strictly
                   above ``min-threshold x n`` (``n``: the share holders of a neighbourhood).
``min-cohort``     ``3`` (default): refuse a round (or a survivor set) of fewer sites.
``allow-seeded-``  ``false`` (default): refuse ``dp.secure_noise: false`` (noise derived from
``noise``          the coordinator's seed, so the coordinator can regenerate it). Rehearsals.
``allow-``         ``false`` (default): refuse ``fedddpm.enabled`` (FedDDPM phase 0 uploads
``individual-``    this site's DP synthetic samples, or its DP model, to the coordinator on
``uploads``        their own, outside secure aggregation).
``allow-ckks``     ``false`` (default): refuse ``secure_aggregation.protocol: ckks`` (every site
                   holds the same CKKS secret key, ``ckks_secret.ctx`` in ``keys-dir``: a
                   coordinator colluding with any site decrypts every update).
``allow-honest-``  ``false`` (default): refuse ``secure_aggregation.server_threat:
``but-curious-``   honest_but_curious`` (the masking protocol without its consistency check,
``server``         one message fewer per round; safe only against a coordinator that follows
                   the protocol).
``allow-audit-``   ``false`` (default): refuse ``canaries.enabled`` under ``dp.level: record``
``canaries``       (the site's per-round canary scores go to the coordinator on their own,
                   outside secure aggregation: m_site coordinates of its privatized gradients).
``max-audit-``     ``1000`` (default): refuse a round that assigns this site more canaries.
``canaries``
=================  ==========================================================================

Site policy (:class:`PolicyError`, naming the field and the node-config key): every message
carries the run id the site accepted at setup (fresh, never accepted twice; bound into every
masking signature, key and ciphertext; a restarted coordinator continues a run with a setup
marked ``resume``, accepted only for a run id the site accepted before and the very experiment
it accepted for it, answered with the site's last trained round); a round at or below the site's
last trained round of the run is refused (replay); the DP plan is pinned at the first DP setup
and any later setup with a different DP-relevant field is refused; each run's DP noise key is
derived from the site's secret key and a fresh per-run nonce (``site_runs.json``), so no two
runs share noise. Audit canaries are refused unless ``allow-audit-canaries``; an assignment must
verify under the coordinator's roster key for the run, round and site, hold at most
``max-audit-canaries`` distinct weight coordinates, and stay the same for the whole run
(:meth:`Site._canary_hook`). FedDiffuse ``usplit`` (two masking sessions a round): the site
recomputes its segments from the experiment's seed and the round's signed client list and
refuses another assignment, checks each session's participants and ``min-cohort`` on its own,
and trains (and is charged) once (:meth:`Site.usplit_train`).


Every handler re-derives what it needs from the node config, the experiment the coordinator
sent at setup (kept in ``state-dir``) and the files in ``state-dir``, so a fresh process per
message (Flower's ``flwr-clientapp``) works. The long-lived site worker
(:mod:`securefed.deploy.worker`) keeps one :class:`Site` per node config: it memoises the
parsed experiment, the site's data and its keys (each keyed by what it was derived from), never
the ledger or the round state, which stay on disk and are written before a reply leaves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefed.artefacts.rundir import LEDGER_FILE, NOISE_KEY_FILE, SECRETS_DIR
from securefed.builders import (
    build_client_level_privacy,
    build_model,
    build_privacy,
    build_strategy_stack,
    prepare_data,
    resolve_device,
)
from securefed.client.dp import sample_rate_for
from securefed.client.runtime import build_trainer, local_round
from securefed.client.trainer import local_steps_for
from securefed.config import (
    ConfigError,
    ExperimentConfig,
    config_differences,
    dump_config,
    parse_config,
)
from securefed.data import ImageDataset, load_dataset
from securefed.deploy.canaries import decode_assignment, encode_scores
from securefed.deploy.common import (
    DeployConfigError,
    check_deployable,
    client_level_layer,
    cohort_session,
    find_layer,
    roster_digest,
    round_masking_params,
    run_masking_params,
)
from securefed.deploy.state import (
    RunRecord,
    SiteRecord,
    clear_round_state,
    load_round_state,
    load_site_record,
    round_session,
    save_round_state,
    save_site_record,
)
from securefed.deploy.wire import (
    MESSAGE_CKKS_DECRYPT,
    MESSAGE_CKKS_UPLOAD,
    MESSAGE_PHASE0,
    MESSAGE_SETUP,
    PROTOCOL_VERSION,
    WireError,
    decode_vector,
    encode_vector,
    get_bytes,
    get_int,
    get_str,
    pack_chunks,
    unpack_chunks,
)
from securefed.diffusion import NoiseSchedule
from securefed.diffusion.params import num_params
from securefed.errors import SecurefedError
from securefed.federation import public_pretrain
from securefed.federation.auxiliary import build_auxiliary_set
from securefed.federation.simulation import SimClient
from securefed.io import atomic_write_bytes, atomic_write_text
from securefed.privacy import SecureGaussian, derive_key, load_or_create_run_key
from securefed.privacy.canaries import ClientCanaries
from securefed.privacy.client_level import geometric_clip_update, unclipped_fraction
from securefed.secagg.base import resolve_threshold
from securefed.secagg.keys import load_client_key, load_roster
from securefed.secagg.masking.client import MaskingClient
from securefed.secagg.masking.graph import effective_degree
from securefed.secagg.masking.messages import (
    ConsistencyRequest,
    ProtocolError,
    RoundStart,
    Stage,
    UnmaskRequest,
    decode_message,
    verify_encoded,
)
from securefed.secagg.masking.plan import MaskingPlan, plan_round
from securefed.seeds import Purpose, derive_seed
from securefed.strategies import build_strategy, pack_update
from securefed.strategies.feddiffuse import FedDiffuse, pair_clients

__all__ = [
    "NodeConfigError",
    "NodeOptions",
    "PolicyError",
    "Site",
    "check_round_policy",
    "check_threshold_policy",
    "dispatch",
    "dp_plan_fields",
]

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"
#: ``<state-dir>/experiments/<run id>.yaml``: the experiment each run was accepted with
RUN_EXPERIMENTS_DIR = "experiments"
CLIENT_STATE_FILE = "client_state.pt"
PENDING_STATE_FILE = "client_state.pending.pt"


class NodeConfigError(SecurefedError, ValueError):
    """A bad ``--node-config`` entry; names the key, the value and the fix."""


class PolicyError(ValueError):
    """The coordinator asked for something this site's policy refuses; ``str(e)`` names the
    field, the value, and the node-config key or record that refuses it."""


#: a run id: 16 random bytes as 32 lowercase hex digits
_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _dotted(doc: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (``client.batch_size``) of a nested mapping (None if absent)."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _opt(cfg: Mapping[str, Any], key: str) -> Any:
    v = cfg.get(key)
    return None if v is None or (isinstance(v, str) and v.strip() == "") else v


def _as_int(cfg: Mapping[str, Any], key: str) -> int | None:
    v = _opt(cfg, key)
    if v is None:
        return None
    try:
        out = int(v)
    except (TypeError, ValueError):
        raise NodeConfigError(
            f"--node-config {key}={v!r}: not an integer; give e.g. {key}=0"
        ) from None
    if out < 0 or (isinstance(v, float) and v != out):
        raise NodeConfigError(f"--node-config {key}={v!r}: must be a non-negative integer")
    return out


def _as_bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = _opt(cfg, key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise NodeConfigError(f"--node-config {key}={v!r}: expected true or false")


@dataclass(frozen=True)
class NodeOptions:
    """The site's own settings (``--node-config``)."""

    state_dir: Path
    keys_dir: Path
    client_id: int
    partition_id: int | None = None
    data_path: Path | None = None
    device: str = "cpu"
    require_dp: bool = True
    max_epsilon: float | None = None
    min_threshold: Fraction = Fraction(2, 3)
    min_cohort: int = 3
    allow_seeded_noise: bool = False
    allow_honest_but_curious_server: bool = False
    allow_individual_uploads: bool = False
    allow_ckks: bool = False
    allow_audit_canaries: bool = False
    max_audit_canaries: int = 1000

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeOptions:
        """Parse and validate ``--node-config``.

        Raises:
            NodeConfigError: naming the key, the value and the fix.
        """
        known = {
            "state-dir", "keys-dir", "client-id", "partition-id", "data-path", "device",
            "require-dp", "max-epsilon", "min-threshold", "min-cohort", "allow-seeded-noise",
            "allow-honest-but-curious-server", "allow-individual-uploads", "allow-ckks",
            "allow-audit-canaries", "max-audit-canaries",
        }
        unknown = sorted(set(node_config) - known)
        if unknown:
            raise NodeConfigError(
                f"--node-config: unknown key(s) {unknown}; known keys: {sorted(known)}"
            )
        state_dir, keys_dir = _opt(node_config, "state-dir"), _opt(node_config, "keys-dir")
        if state_dir is None:
            raise NodeConfigError(
                "--node-config state-dir: required; give a local folder for the privacy "
                "ledger and protocol state, e.g. state-dir=\"/var/lib/securefed\""
            )
        if keys_dir is None:
            raise NodeConfigError(
                "--node-config keys-dir: required; give the folder holding this site's "
                "client_<id>.key and roster.json (securefed keys init)"
            )
        pid = _as_int(node_config, "partition-id")
        cid = _as_int(node_config, "client-id")
        data_path = _opt(node_config, "data-path")
        if (pid is None) == (data_path is None):
            raise NodeConfigError(
                "--node-config: give exactly one of data-path=\"/data/site\" (the site's image "
                "folder) or partition-id=N (rehearsal: a partition of the experiment's dataset)"
            )
        if cid is None:
            if pid is None:
                raise NodeConfigError(
                    "--node-config client-id: required with data-path; give this site's id in "
                    "the roster, e.g. client-id=0"
                )
            cid = pid
        device = str(_opt(node_config, "device") or "cpu")
        if device not in ("cpu", "cuda", "auto"):
            raise NodeConfigError(f"--node-config device={device!r}: one of cpu, cuda, auto")
        max_eps = _opt(node_config, "max-epsilon")
        if max_eps is not None:
            try:
                max_eps = float(max_eps)
            except (TypeError, ValueError):
                raise NodeConfigError(
                    f"--node-config max-epsilon={max_eps!r}: not a number; e.g. max-epsilon=8"
                ) from None
            if not max_eps > 0:
                raise NodeConfigError(f"--node-config max-epsilon={max_eps}: must be > 0")
        min_t = _opt(node_config, "min-threshold")
        min_threshold = Fraction(2, 3)
        if min_t is not None:
            try:
                min_threshold = Fraction(str(min_t).strip())
            except (TypeError, ValueError, ZeroDivisionError):
                raise NodeConfigError(
                    f"--node-config min-threshold={min_t!r}: not a number; give a fraction such "
                    "as min-threshold=\"2/3\" or 0.75"
                ) from None
            if not 0 < min_threshold < 1:
                raise NodeConfigError(
                    f"--node-config min-threshold={min_t!r}: must be in (0, 1); the site requires "
                    "a Shamir threshold t > min-threshold x n"
                )
        min_cohort = _as_int(node_config, "min-cohort")
        max_canaries = _as_int(node_config, "max-audit-canaries")
        if min_cohort is not None and min_cohort < 2:
            raise NodeConfigError(
                f"--node-config min-cohort={min_cohort}: must be >= 2 (secure aggregation needs "
                "at least 2 sites in a sum)"
            )
        return cls(
            state_dir=Path(str(state_dir)).expanduser(),
            keys_dir=Path(str(keys_dir)).expanduser(),
            client_id=cid,
            partition_id=pid,
            data_path=None if data_path is None else Path(str(data_path)).expanduser(),
            device=device,
            require_dp=_as_bool(node_config, "require-dp", True),
            max_epsilon=max_eps,
            min_threshold=min_threshold,
            min_cohort=3 if min_cohort is None else min_cohort,
            allow_seeded_noise=_as_bool(node_config, "allow-seeded-noise", False),
            allow_honest_but_curious_server=_as_bool(
                node_config, "allow-honest-but-curious-server", False
            ),
            allow_individual_uploads=_as_bool(node_config, "allow-individual-uploads", False),
            allow_ckks=_as_bool(node_config, "allow-ckks", False),
            allow_audit_canaries=_as_bool(node_config, "allow-audit-canaries", False),
            max_audit_canaries=1000 if max_canaries is None else max_canaries,
        )


def dp_plan_fields(cfg: ExperimentConfig, num_examples: int) -> dict[str, Any]:
    """Every field the site's DP guarantee depends on, as pinned at its first DP setup.

    The experiment's DP section, what sets the sample rate and the number of steps (batch size,
    local steps or epochs, rounds, FedDDPM pre-training), and what follows from the site's own
    data (its example count, the sample rate ``q`` and the steps per round it implies).
    """
    dp, cl = cfg.dp, cfg.client
    fields: dict[str, Any] = {
        "dp.level": dp.level,
        "dp.target_epsilon": dp.target_epsilon,
        "dp.delta": dp.delta,
        "dp.max_grad_norm": dp.max_grad_norm,
        "dp.noise_multiplier": dp.noise_multiplier,
        "dp.accountant": dp.accountant,
        "dp.noise_multiplicity": dp.noise_multiplicity,
        "dp.poisson_sampling": dp.poisson_sampling,
        "dp.secure_noise": dp.secure_noise,
        "client.batch_size": cl.batch_size,
        "client.local_steps": cl.local_steps,
        "client.local_epochs": cl.local_epochs,
        "federation.rounds": cfg.federation.rounds,
        "fedddpm.enabled": cfg.fedddpm.enabled,
        "fedddpm.pretrain_epochs": cfg.fedddpm.pretrain_epochs,
        "examples (this site's data)": int(num_examples),
        "sample rate q (batch_size / examples)": sample_rate_for(cl, num_examples),
        "steps per round": local_steps_for(cl, num_examples),
    }
    if dp.level == "client":  # what sets the noise plan and the worst-case charge
        sa, fed = cfg.secure_aggregation, cfg.federation
        fields.update({
            "dp.max_update_norm": dp.max_update_norm,
            "dp.adaptive_clipping": dp.adaptive_clipping,
            "dp.target_unclipped_quantile": dp.target_unclipped_quantile,
            "dp.clip_learning_rate": dp.clip_learning_rate,
            "dp.clipped_count_stddev": dp.clipped_count_stddev,
            "federation.num_clients": fed.num_clients,
            "federation.fraction_fit": fed.fraction_fit,
            "federation.min_fit_clients": fed.min_fit_clients,
            "secure_aggregation.threshold": sa.threshold,
            "secure_aggregation.neighbours": sa.neighbours,
            "secure_aggregation.bits": sa.bits,
            "secure_aggregation.clip_range": sa.clip_range,
        })
    return dict(json.loads(json.dumps(fields)))  # exactly what the registry stores


def _check_dp_pin(pinned: Mapping[str, Any], now: Mapping[str, Any], what: str) -> None:
    for key in sorted(set(pinned) | set(now)):
        if pinned.get(key) != now.get(key):
            raise PolicyError(
                f"{key}: {now.get(key)!r} differs from the DP plan this site pinned at its first "
                f"setup ({pinned.get(key)!r}); refusing {what}. The site's privacy ledger is "
                "planned and charged for that plan: a coordinator may not change how it trains. "
                "To run another plan, the site operator starts a new state-dir"
            )


def check_threshold_policy(cfg: ExperimentConfig, options: NodeOptions) -> None:
    """Refuse an experiment whose secure-aggregation threshold or cohort the site would refuse
    in some round: every cohort size from ``min-cohort`` to ``federation.num_clients``.

    Raises:
        PolicyError: naming the experiment field and the node-config key.
    """
    sa, fed = cfg.secure_aggregation, cfg.federation
    if sa.server_threat != "malicious" and not options.allow_honest_but_curious_server:
        raise PolicyError(
            f"secure_aggregation.server_threat: {sa.server_threat!r} skips the masking "
            "protocol's consistency check, which is what stops a coordinator that shows two "
            "groups of sites different survivor sets from unmasking one site's update; this site "
            "assumes a malicious coordinator (set server_threat: malicious, or opt in with "
            "--node-config allow-honest-but-curious-server=true)"
        )
    n = fed.num_clients
    if n < options.min_cohort:
        raise PolicyError(
            f"federation.num_clients: {n} is below this site's min-cohort {options.min_cohort} "
            "(--node-config min-cohort): a sum over so few sites lets the others (with the "
            "coordinator) subtract their own updates"
        )
    planned = min(n, max(fed.min_fit_clients, round(fed.fraction_fit * n)))
    if planned < options.min_cohort:
        raise PolicyError(
            f"federation.fraction_fit: {fed.fraction_fit} (min_fit_clients "
            f"{fed.min_fit_clients}) selects {planned} sites a round, below this site's "
            f"min-cohort {options.min_cohort} (--node-config min-cohort)"
        )
    if cfg.feddiffuse.enabled and cfg.feddiffuse.variant == "usplit":
        # pair_clients: a round of m sites is two sessions of ceil(m / 2) (the odd site in both)
        half = (planned + 1) // 2
        if half < options.min_cohort:
            raise PolicyError(
                f"feddiffuse.variant: 'usplit' splits a round of {planned} sites into two "
                f"aggregation sessions (front, back) of {half} sites each, below this site's "
                f"min-cohort {options.min_cohort} (--node-config min-cohort): usplit needs "
                f"about 2 x min-cohort sites a round ({2 * options.min_cohort - 1} or more; "
                "raise federation.fraction_fit / min_fit_clients, add sites, or use another "
                "variant)"
            )
    k = None if sa.neighbours == "all" else int(sa.neighbours)
    for m in range(max(2, options.min_cohort), n + 1):
        size = effective_degree(k, m) + 1
        try:
            t = resolve_threshold(float(sa.threshold), size)
        except ValueError:
            continue  # such a round cannot run at all
        if not t > options.min_threshold * size:
            raise PolicyError(
                f"secure_aggregation.threshold: {sa.threshold:g} gives t={t} of the {size} share "
                f"holders of a round of {m} sites; this site requires t > {options.min_threshold}"
                f" x {size} (--node-config min-threshold={options.min_threshold}): with a lower "
                "threshold an active coordinator can show two groups different survivor sets and "
                "unmask one site's update (Bonawitz et al. 2017)"
            )


def check_round_policy(plan: MaskingPlan, options: NodeOptions) -> None:
    """Refuse a round below the site's cohort or threshold floor (before it trains).

    Raises:
        PolicyError: naming the round, the value and the node-config key.
    """
    m = len(plan.participants)
    if m < options.min_cohort:
        raise PolicyError(
            f"round {plan.round_id}: a cohort of {m} sites {list(plan.participants)} is below "
            f"this site's min-cohort {options.min_cohort} (--node-config min-cohort)"
        )
    size, t = plan.graph.neighbourhood_size, plan.threshold
    if not t > options.min_threshold * size:
        raise PolicyError(
            f"round {plan.round_id}: secure_aggregation.threshold gives t={t} of {size} share "
            f"holders; this site requires t > {options.min_threshold} x {size} "
            f"(--node-config min-threshold={options.min_threshold})"
        )


def _refuse_trained(run: RunRecord, rnd: int) -> None:
    """Replay: a round at or below the site's last trained round of the run is refused."""
    if rnd <= run.last_trained_round:
        raise PolicyError(
            f"round: {rnd} is at or below this site's last trained round "
            f"{run.last_trained_round} of run {run.run_id}; a round is trained once (two "
            "sums of one round over different cohorts would reveal a site's update)"
        )


def _check_clip(broadcast: Mapping[str, Any], noise: Any, rnd: int, rel: float = 0.0) -> None:
    """Refuse a round whose broadcast clip norm (or clip-bit scale) is not the site's own plan:
    a larger norm would let an update of that size through at the noise the site planned."""
    got = [float(v) for v in broadcast["clip"]] if "clip" in broadcast else None
    # the wire carries float32: compare at that precision
    want = [float(np.float32(noise.clip)), float(np.float32(noise.bit_scale))]
    if got is None or len(got) != 2 or any(
        abs(g - w) > rel * abs(w) for g, w in zip(got, want, strict=True)
    ):
        raise PolicyError(
            f"round {rnd}: broadcast clip {got} differs from this site's plan {want} "
            "(dp.max_update_norm of the experiment it pinned); refusing to train"
        )


def run_noise_key(master_key: bytes, run: RunRecord) -> bytes:
    """This run's DP noise key: HKDF-SHA256(site secret key, salt = the run's fresh nonce,
    info = run id). Fresh per run, reproducible within it (a site that crashes mid-run keeps
    drawing the noise of its own run), useless without the site's secret key."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=bytes.fromhex(run.noise_nonce),
        info=b"securefed/deploy/site-run-noise/v1/" + bytes.fromhex(run.run_id),
    ).derive(master_key)


class Site:
    """One site's handlers; everything it keeps lives under ``options.state_dir``."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.who = f"site {options.client_id}"
        # warm-process caches (site worker): what -> (key it was derived from, value)
        self._memo: dict[str, tuple[Any, Any]] = {}

    def _memoised(self, what: str, key: Any, build: Any) -> Any:
        hit = self._memo.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._memo[what] = (key, value)
        return value

    @staticmethod
    def _stamp(*paths: Path) -> tuple[tuple[int, int] | None, ...]:
        out: list[tuple[int, int] | None] = []
        for p in paths:
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    # ------------------------------------------------------------------ helpers
    @property
    def cid(self) -> int:
        return self.options.client_id

    def _experiment(self) -> ExperimentConfig:
        path = self.options.state_dir / EXPERIMENT_FILE
        if not path.exists():
            raise WireError(
                f"{self.who}: no experiment in {path}: the coordinator must run setup first"
            )
        return self._memoised(
            "experiment", self._stamp(path),
            lambda: parse_config(yaml.safe_load(path.read_text(encoding="utf-8"))),
        )

    def load_data(self, cfg: ExperimentConfig) -> ImageDataset:
        """This site's training examples (nothing else is loaded into the trainer); memoised
        on the experiment fields that select them."""
        key = (cfg.data.model_dump_json(), cfg.partition.model_dump_json(),
               cfg.federation.num_clients, cfg.seed)
        return self._memoised("data", key, lambda: self._load_data(cfg))

    def _load_data(self, cfg: ExperimentConfig) -> ImageDataset:
        o = self.options
        if o.data_path is not None:
            if not o.data_path.is_dir():
                raise NodeConfigError(
                    f"--node-config data-path={str(o.data_path)!r}: not a folder; give the "
                    "folder holding <site>/<class>/<image> files"
                )
            data_cfg = cfg.data.model_copy(update={"name": "image_folder", "root": o.data_path})
            return load_dataset(data_cfg)

        prepared = prepare_data(cfg)
        pid = o.partition_id if o.partition_id is not None else self.cid
        if pid >= len(prepared.parts):
            raise NodeConfigError(
                f"--node-config partition-id={pid}: the experiment has only "
                f"{len(prepared.parts)} partitions (federation.num_clients)"
            )
        return prepared.members.subset(prepared.parts[pid])

    def _identity(self) -> tuple[Any, Any]:
        kd = self.options.keys_dir
        return self._memoised(
            "identity", self._stamp(kd / "roster.json", kd / f"client_{self.cid}.key"),
            self._load_identity,
        )

    def _load_identity(self) -> tuple[Any, Any]:
        def _raw(k: Any) -> bytes:
            return bytes(
                k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            )

        roster = load_roster(self.options.keys_dir)
        pub = roster.client(self.cid)
        if pub is None:
            raise NodeConfigError(
                f"--node-config client-id={self.cid}: not in the roster "
                f"{self.options.keys_dir / 'roster.json'}; use this site's id from "
                "`securefed keys init`"
            )
        key = load_client_key(self.options.keys_dir, self.cid)
        if _raw(key.public_key()) != _raw(pub):
            raise NodeConfigError(
                f"keys-dir: client_{self.cid}.key does not match the roster's key for client "
                f"{self.cid}; copy the matching pair from `securefed keys init`"
            )
        return key, roster

    def _privacy(self, cfg: ExperimentConfig, data: ImageDataset) -> Any | None:
        if cfg.dp.level not in ("record", "client"):
            return None

        ledger = self.options.state_dir / LEDGER_FILE
        me = [SimClient(self.cid, data)]
        if cfg.dp.level == "client":  # this site's ledger, planned from the pinned experiment
            base = build_strategy(cfg.strategy, cfg.federation.num_clients)
            return build_client_level_privacy(
                cfg, self.options.state_dir, me, base, resume=ledger.exists()
            )[1]
        return build_privacy(cfg, self.options.state_dir, me, resume=ledger.exists())

    # ------------------------------------------------------------------ policy
    def _record(self) -> SiteRecord:
        return load_site_record(self.options.state_dir)

    def _current_run(self, record: SiteRecord, content: Mapping[str, Any]) -> RunRecord:
        """The run this message claims, if it is the run the site accepted at its last setup."""
        run_id = get_str(content, "run_id", "coordinator")
        if record.current is None or run_id != record.current:
            raise PolicyError(
                f"run_id: {run_id!r} is not the run this site accepted at setup "
                f"({record.current!r}); a message of another run (or of a run this site never "
                "accepted) is refused"
            )
        run = record.run(run_id)
        path = self.options.state_dir / EXPERIMENT_FILE
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
        if digest != run.experiment_sha256:
            raise PolicyError(
                f"{path}: the experiment changed since this site accepted run {run_id} "
                "(its SHA-256 differs from site_runs.json); refusing the run"
            )
        return run

    def _bind_run_noise(self, privacy: Any, cfg: ExperimentConfig, run: RunRecord) -> Any:
        """``privacy`` with noise sources keyed by this run's fresh noise key."""
        if privacy is None or privacy.level != "record" or not cfg.dp.secure_noise:
            return privacy

        master = load_or_create_run_key(self.options.state_dir / SECRETS_DIR / NOISE_KEY_FILE)
        key = run_noise_key(master, run)

        def source(rnd: int, cid: int) -> Any:
            return SecureGaussian(key=derive_key(key, rnd, cid))

        def phase_source(rnd: int, cid: int, phase: int) -> Any:
            return SecureGaussian(key=derive_key(key, rnd, cid, phase))

        return dataclasses.replace(privacy, noise_source=source, phase_noise_source=phase_source)

    # ------------------------------------------------------------------ setup
    def setup(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Accept (or refuse) the coordinator's experiment and run id; plan this site's privacy
        ledger; pin its DP plan; record the run (with a fresh noise nonce).

        A resume (``resume: 1``, the coordinator restarted from its latest checkpoint) proposes
        a run id this site accepted before, with the experiment it accepted for that run
        (:meth:`_check_resumed_experiment`); every other check runs again, the run keeps its
        record (noise nonce, last trained round, pinned canaries) and the reply adds the last
        round this site trained in that run (``last_trained_round``): the coordinator
        continues above it, since a round at or below it is still refused (replay)."""
        who = "coordinator"
        version = get_str(content, "version", who)
        if version != PROTOCOL_VERSION:
            raise WireError(
                f"{self.who}: coordinator speaks {version!r}, this site {PROTOCOL_VERSION!r}; "
                "install the same securefed version at every party"
            )
        run_id = get_str(content, "run_id", who)
        if not _RUN_ID.fullmatch(run_id):
            raise WireError(f"coordinator: run_id: {run_id!r} is not 32 lowercase hex digits")
        resume = "resume" in content and get_int(content, "resume", who, minimum=0) == 1
        record = self._record()
        if resume and run_id not in record.runs:
            raise PolicyError(
                f"run_id: {run_id!r} is not a run this site accepted (it accepted "
                f"{len(record.runs)} run(s)); a resume continues a run the site accepted at "
                "setup, so this one is refused: the coordinator must start a new run (a new "
                "run-dir, without resume=true)"
            )
        if not resume and run_id in record.runs:
            raise PolicyError(
                f"run_id: {run_id!r} was already accepted by this site (at "
                f"{time.ctime(record.runs[run_id].accepted)}); every run needs a fresh run id, "
                "a coordinator re-using one could replay that run's rounds (a coordinator "
                "that continues the run sends resume=true, docs/deploy.md)"
            )
        text = get_str(content, "experiment", who)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"coordinator experiment: not valid YAML: {exc}") from None
        cfg = parse_config(raw if isinstance(raw, dict) else {})
        if resume:
            self._check_resumed_experiment(record.runs[run_id], cfg)
        check_deployable(cfg)
        o = self.options
        if o.require_dp and cfg.dp.level not in ("record", "client"):
            raise DeployConfigError(
                f"dp.level: {cfg.dp.level!r}: this site requires DP (--node-config "
                "require-dp=true); the coordinator must set dp.level: record (each patient's "
                "record) or client (the site's whole dataset, which protects every record too)"
            )
        eps = cfg.dp.target_epsilon
        if o.max_epsilon is not None and cfg.dp.level in ("record", "client"):
            if eps is None or eps > o.max_epsilon:
                raise DeployConfigError(
                    f"dp.target_epsilon: {eps} exceeds this site's max-epsilon "
                    f"{o.max_epsilon}; the coordinator must lower it"
                )
        if cfg.dp.level == "record" and not cfg.dp.secure_noise:
            if not o.allow_seeded_noise:
                raise PolicyError(
                    "dp.secure_noise: false derives the DP noise from the experiment's seed, "
                    "which the coordinator knows (it could regenerate and remove the noise); "
                    "this site refuses it (--node-config allow-seeded-noise=false, rehearsals "
                    "only may set it to true)"
                )
            used = sorted(r.run_id for r in record.runs.values()
                          if r.seed == cfg.seed and r.run_id != run_id)  # a resume: its own
            if used:
                raise PolicyError(
                    f"seed: {cfg.seed} was already used by run {used[0]} of this site; under "
                    "dp.secure_noise: false the same seed would draw the same DP noise again"
                )
        if self.cid >= cfg.federation.num_clients:
            raise NodeConfigError(
                f"--node-config client-id={self.cid}: the experiment has "
                f"federation.num_clients={cfg.federation.num_clients} (ids 0..."
                f"{cfg.federation.num_clients - 1})"
            )
        check_threshold_policy(cfg, o)
        if cfg.secure_aggregation.protocol == "ckks":
            if not o.allow_ckks:
                raise PolicyError(
                    "secure_aggregation.protocol: 'ckks' gives every site the same secret key: "
                    "a coordinator colluding with any one site decrypts every update, and one "
                    "that deviates can use the key holder as a decryption oracle; this site "
                    "refuses it (opt in with --node-config allow-ckks=true, or use 'masking')"
                )
            self._ckks_client(cfg)  # the secret context is here, 0600, with these parameters
        if cfg.fedddpm.enabled and not o.allow_individual_uploads:
            raise PolicyError(
                f"fedddpm.enabled: FedDDPM phase 0 uploads this site's {cfg.fedddpm.upload} "
                "(from its DP-trained local model) to the coordinator on their own, outside "
                "secure aggregation; this site refuses individual uploads (opt in with "
                "--node-config allow-individual-uploads=true)"
            )
        if cfg.canaries.enabled and cfg.dp.level == "record" and not o.allow_audit_canaries:
            raise PolicyError(
                "canaries.enabled: the audit's gradient canaries make this site send the "
                "coordinator its canary scores each round on their own, outside secure "
                "aggregation (the privatized gradient sums along up to max-audit-canaries "
                f"coordinates, now {o.max_audit_canaries}); this site refuses them (opt in with "
                "--node-config allow-audit-canaries=true, or the coordinator sets "
                "canaries.enabled: false)"
            )
        if cfg.fedddpm.enabled and cfg.dp.level != "record" and o.require_dp:
            raise PolicyError(
                "fedddpm.enabled: the phase-0 upload is DP only under dp.level: record; this "
                "site requires DP (--node-config require-dp=true)"
            )
        self._identity()
        data = self.load_data(cfg)
        if len(data) == 0:
            raise NodeConfigError(f"{self.who}: no training examples")
        if cfg.pretrain.enabled:  # the coordinator holds no private data: the site checks
            # through the module: a test substitutes public_pretrain.load_public
            public = public_pretrain.load_public(cfg.pretrain, data.image_shape)
            public_pretrain.check_disjoint(public, [data])
        pin = None
        if cfg.dp.level in ("record", "client"):
            pin = dp_plan_fields(cfg, len(data))
            if record.dp_plan is not None:
                _check_dp_pin(record.dp_plan, pin, f"run {run_id}")
        o.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        privacy = self._privacy(cfg, data)
        text = dump_config(cfg)
        atomic_write_text(o.state_dir / EXPERIMENT_FILE, text)
        # a previous run's round state is void, and so is an interrupted round of a resumed
        # run (the restarted coordinator starts its rounds afresh, above the last trained one)
        clear_round_state(o.state_dir)
        if pin is not None and record.dp_plan is None:
            record.dp_plan = pin
        if not resume:
            record.runs[run_id] = RunRecord(
                run_id=run_id,
                accepted=time.time(),
                noise_nonce=os.urandom(32).hex(),
                seed=int(cfg.seed),
                experiment_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            )
            # the experiment of this run, kept to name what changed if a resume proposes another
            atomic_write_text(self._run_experiment_path(run_id), text, mode=0o600)
        run = record.runs[run_id]
        if record.current != run_id or not resume:
            # the private strategy state on disk (SCAFFOLD's control variate, FedDiffuse's
            # local groups) belongs to the run this site served last: a new run starts without
            # it (as the simulation's clients do), and so does a resume of another run than the
            # last one (its state was dropped when the site moved on)
            for name in (CLIENT_STATE_FILE, PENDING_STATE_FILE):
                if (o.state_dir / name).exists():
                    log.info("%s: run %s starts without the private strategy state of run %s",
                             self.who, run_id, record.current)
                    (o.state_dir / name).unlink()
        record.current = run_id
        save_site_record(o.state_dir, record)
        c, h, w = data.image_shape
        reply: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "run_id": run_id,
            "client_id": self.cid,
            "num_examples": len(data),
            "image_shape": [int(c), int(h), int(w)],
            "num_classes": int(data.num_classes),
            "roster_sha256": roster_digest(o.keys_dir),
        }
        if privacy is not None:
            reply["epsilon"] = float(privacy.ledger.epsilon(self.cid))
        if resume:  # where the coordinator may continue: above this round (replay rule)
            reply["last_trained_round"] = int(run.last_trained_round)
        return reply

    def _run_experiment_path(self, run_id: str) -> Path:
        """``<state-dir>/experiments/<run id>.yaml``: the experiment accepted for a run."""
        return self.options.state_dir / RUN_EXPERIMENTS_DIR / f"{run_id}.yaml"

    def _check_resumed_experiment(self, run: RunRecord, cfg: ExperimentConfig) -> None:
        """A resume must propose exactly the experiment this site accepted for the run (the
        SHA-256 of its resolved YAML, as recorded in ``site_runs.json``): the run's ledger
        plan, cohorts, noise and pinned canaries were agreed for it.

        Raises:
            PolicyError: naming each changed field with both values (from the run's stored
                experiment), or ``experiment`` when the stored copy is gone.
        """
        text = dump_config(cfg)
        if hashlib.sha256(text.encode("utf-8")).hexdigest() == run.experiment_sha256:
            return
        stored_text = None
        for path in (self._run_experiment_path(run.run_id),
                     self.options.state_dir / EXPERIMENT_FILE):
            if path.is_file():
                raw = path.read_bytes()
                if hashlib.sha256(raw).hexdigest() == run.experiment_sha256:
                    stored_text = raw.decode("utf-8")
                    break
        changed: list[str] = []
        if stored_text is not None:
            stored = parse_config(yaml.safe_load(stored_text))
            a, b = stored.model_dump(mode="json"), cfg.model_dump(mode="json")
            changed = [
                f"{k}: {_dotted(b, k)!r} (accepted: {_dotted(a, k)!r})"
                for k in config_differences(stored, cfg)
            ]
        what = "; ".join(changed) if changed else (
            f"experiment: its SHA-256 {hashlib.sha256(text.encode()).hexdigest()[:16]}... is "
            f"not the {run.experiment_sha256[:16]}... this site accepted"
        )
        raise PolicyError(
            f"{what}: a resume of run {run.run_id} must propose the experiment this site "
            "accepted for it (its privacy ledger, cohorts and noise were planned for that "
            "experiment); resume with the run's own config.yaml, or start a new run (a new "
            "run-dir, without resume=true)"
        )

    # ------------------------------------------------------------------ one round
    def _commit_previous(self, content: Mapping[str, Any]) -> None:
        """Commit (or drop) the private strategy state of the previous round."""
        pending = self.options.state_dir / PENDING_STATE_FILE
        if not pending.exists():
            return
        committed = get_int(content, "commit", "coordinator", minimum=0) == 1
        if committed:
            pending.replace(self.options.state_dir / CLIENT_STATE_FILE)
        else:
            pending.unlink()

    def _client_state(self) -> dict[str, torch.Tensor]:
        path = self.options.state_dir / CLIENT_STATE_FILE
        if not path.exists():
            return {}
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise WireError(f"{path}: not a mapping of tensors")
        return dict(state)

    def _round_start(
        self, opening: bytes, rnd: int, run: RunRecord, cfg: ExperimentConfig,
        clip: float | None = None,
    ) -> tuple[MaskingPlan, Any]:
        """Check a :class:`RoundStart` before anything is spent on its round: addressed to this
        site for round ``rnd``, signed by the server under this run, above the site's last
        trained round, and a cohort the site's policy accepts. Returns the round's plan and
        masking parameters (with client-level DP: the noise this site plans for the round)."""
        params = run_masking_params(cfg, run.run_id)
        who = "coordinator"
        _refuse_trained(run, rnd)
        start = decode_message(opening, self.cid, params.session)
        if not (
            isinstance(start, RoundStart) and start.round_id == rnd and start.recipient == self.cid
        ):
            raise WireError(f"{who}: secagg: not this site's RoundStart of round {rnd}")
        # checked before training: a forged or replayed round start must not spend budget
        if not verify_encoded(opening, self._identity()[1].server, params.session):
            raise ProtocolError(
                self.cid, "signature", f"RoundStart of round {rnd} from the server does not "
                f"verify under run {run.run_id}"
            )
        try:
            params = round_masking_params(
                cfg, run.run_id, len(start.participants), start.vector_length, clip
            )
            plan = plan_round(params, rnd, start.participants, start.vector_length)
        except ValueError as exc:
            raise WireError(f"{who}: round {rnd} cannot run: {exc}") from None
        check_round_policy(plan, self.options)
        return plan, params

    def _round_params(self, cfg: ExperimentConfig, run: RunRecord, rnd: int) -> Any:
        """``(participants, vector_length) -> MaskingParams`` of round ``rnd`` (with adaptive
        clipping: at the clip norm recorded when the round started)."""
        clip = run.round_clips.get(rnd)

        def params(participants: int, length: int) -> Any:
            return round_masking_params(cfg, run.run_id, participants, length, clip)

        return params

    def _adaptive_clip(self, cfg: ExperimentConfig, content: Mapping[str, Any]) -> float | None:
        """Client-level DP with adaptive clipping: the round's clip norm ``S`` from the
        broadcast (``broadcast.clip = [S, beta]``; the site checks beta against its own plan
        when it trains). Any finite ``S > 0`` keeps the site's guarantee: its noise scales with
        ``S``, so the multiplier it is charged does not change."""
        if cfg.dp.level != "client" or not cfg.dp.adaptive_clipping:
            return None
        clip = decode_vector(get_bytes(content, "broadcast.clip", "coordinator"), 2,
                             "coordinator", "broadcast.clip")
        s = float(clip[0])
        if not (s > 0 and s < float("inf")):
            raise WireError(f"coordinator: broadcast.clip: clip norm {s} is not a positive number")
        return s
    def _train(
        self, content: Mapping[str, Any], cfg: ExperimentConfig, record: SiteRecord,
        run: RunRecord, rnd: int, plan: MaskingPlan | None,
        round_clients: list[int] | None = None,
    ) -> tuple[np.ndarray, list[str], Any, Any, Any, Any] | dict[str, Any]:
        """Train this site's round ``rnd`` on the broadcast in ``content`` (DP, ledger charged
        and persisted, the round recorded as trained). Returns ``(vector, vector keys, update,
        privacy, client-level noise plan, canary hook)``, or the reply of a site whose budget
        is exhausted.

        Audit canaries (``canaries`` in ``content``, record-level DP): checked against the
        site's policy before anything is spent (:meth:`_canary_hook`) and inserted at every
        DP-SGD step exactly as the simulation inserts them; their scores leave with the reply.

        Client-level DP: the site plans the round's noise itself (its multiplier, from the
        experiment it pinned; the round's cohort and length from the signed round start),
        refuses a broadcast clip norm other than its own, and charges that plan's worst-case
        multiplier before the update leaves (its masking client adds the noise share).

        FedDiffuse ``usplit`` (``round_clients``: the round's signed client list): the
        strategy's segment assignment is recomputed here from that list and the experiment's
        seed (:meth:`~securefed.strategies.feddiffuse.FedDiffuse.assign`), never taken from the
        coordinator."""
        who = "coordinator"
        _refuse_trained(run, rnd)  # every path that trains passes here
        self._commit_previous(content)
        scale = content.get("weight_scale")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
            raise WireError(f"{who}: weight_scale: expected a positive number, got {scale!r}")
        shape = content.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(v, int) and v > 0 for v in shape
        )):
            raise WireError(f"{who}: image_shape: expected 3 positive integers, got {shape!r}")
        num_classes = get_int(content, "num_classes", who, minimum=1)
        data = self.load_data(cfg)
        if tuple(data.image_shape) != tuple(shape):
            raise WireError(
                f"{self.who}: the round's image shape {shape} differs from this site's "
                f"{list(data.image_shape)}; set data.image_size / data.channels in the experiment"
            )
        if cfg.dp.level in ("record", "client"):
            if record.dp_plan is None:
                raise PolicyError(f"{self.who}: no DP plan was pinned at setup; run setup again")
            _check_dp_pin(record.dp_plan, dp_plan_fields(cfg, len(data)), f"round {rnd}")
        dev = resolve_device(self.options.device)
        model = build_model(cfg, (shape[0], shape[1], shape[2]), num_classes).to(dev)
        d = num_params(model)
        names = content.get("broadcast_keys")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise WireError(f"{who}: broadcast_keys: expected a non-empty list of names")
        # every broadcast vector is [D] except client-level DP's clip: [S, beta]
        broadcast = {
            n: decode_vector(
                get_bytes(content, f"broadcast.{n}", who), 2 if n == "clip" else d, who,
                f"broadcast.{n}",
            )
            for n in names
        }
        strategy = build_strategy_stack(cfg, model, float(scale))
        if round_clients is not None:
            _feddiffuse_layer(strategy).assign(rnd, round_clients)
        privacy = self._bind_run_noise(self._privacy(cfg, data), cfg, run)

        def exhausted(ledger: Any) -> dict[str, Any]:
            """This site releases nothing this round: marked exhausted, round state cleared."""
            ledger.mark_exhausted(self.cid, rnd)
            clear_round_state(self.options.state_dir)
            return {"status": "budget_exhausted", "round": rnd, "run_id": run.run_id,
                    "epsilon": float(ledger.epsilon(self.cid))}

        noise = None
        if cfg.dp.level == "client":
            layer = client_level_layer(strategy)
            if plan is not None:  # masking: the cohort and length of the signed round start
                cohort, length = len(plan.participants), plan.vector_length
            elif cfg.secure_aggregation.protocol == "ckks":
                # CKKS (honest-but-curious coordinator, opted in): the round message names the
                # cohort; the packed length is the model's, the adaptive clip bit's (if any) and
                # the weight's, as ClientLevelDP.configure_round plans it
                cohort = len(content["participants"])
                length = d + (2 if cfg.dp.adaptive_clipping else 1)
                if cohort > cfg.federation.num_clients:  # shares scaled for sites that do
                    # not exist would leave the sum under-noised
                    raise PolicyError(
                        f"round {rnd}: a cohort of {cohort} sites exceeds the federation's "
                        f"{cfg.federation.num_clients} (federation.num_clients of the pinned plan)"
                    )
            else:  # pragma: no cover - check_deployable admits masking and CKKS only
                raise WireError(f"{who}: client-level DP needs the round's signed start")
            if cfg.dp.adaptive_clipping:  # this round's S (recorded at its start / upload)
                layer.clip = run.round_clips[rnd]
            noise = layer.round_noise(cohort, length)
            # adaptive: S is the broadcast's own; beta is recomputed here (float32 on the wire)
            _check_clip(broadcast, noise, rnd, rel=1e-6 if cfg.dp.adaptive_clipping else 0.0)
            client_level_layer(strategy).current = noise
            steps, z, q = 1, noise.charged_multiplier, 1.0
        else:
            steps = local_steps_for(cfg.client, len(data))
            z = privacy.noise_multipliers[self.cid] if privacy is not None else 0.0
            q = sample_rate_for(cfg.client, len(data))
        if privacy is not None and privacy.ledger.would_exceed(
            self.cid, steps, noise_multiplier=z, sample_rate=q
        ):
            return exhausted(privacy.ledger)  # its next round would exceed target_epsilon
        trainer = build_trainer(cfg, model, NoiseSchedule.from_config(cfg.diffusion), dev)
        hook = self._canary_hook(content, cfg, run, rnd, trainer.model, len(data))
        client_state = self._client_state()
        local = local_round(
            cfg, strategy.client, trainer, self.cid, data, broadcast, client_state, rnd, privacy,
            client_level_charge=z if cfg.dp.level == "client" else None, canaries=hook,
        )
        if local is None:  # a replayed round whose fresh-noise retrain exceeds the budget
            if privacy is None:  # pragma: no cover - local_round returns None only under DP
                raise RuntimeError(f"{self.who}: round {rnd} released nothing without DP")
            return exhausted(privacy.ledger)
        update = local[0]
        # recorded (atomically) before anything derived from the update can leave the site
        run.last_trained_round = rnd
        save_site_record(self.options.state_dir, record)
        keys = sorted(update.vectors)
        vector = pack_update(update.vectors, keys, update.weight)
        return vector, keys, update, privacy, noise, hook

    def _canary_hook(
        self, content: Mapping[str, Any], cfg: ExperimentConfig, run: RunRecord, rnd: int,
        model: torch.nn.Module, num_examples: int,
    ) -> ClientCanaries | None:
        """The round's audit canaries of this site, or None when the message has none.

        The assignment must verify under the coordinator's roster key for this run, round and
        site (:func:`~securefed.deploy.canaries.decode_assignment`), and pass the site's policy:
        opted in (``allow-audit-canaries``), at most ``max-audit-canaries`` (and at most the
        experiment's ``canaries.m``), each a distinct coordinate of a weight tensor (``ndim >=
        2``), and the same set in every round of the run (pinned in ``site_runs.json`` at the
        first round that assigned canaries). The canary gradient is ``C`` (``dp.max_grad_norm``
        of the pinned plan, checked before this runs) times the Dirac direction; no magnitude
        is taken from the message.

        Raises:
            PolicyError: naming the field, the value and the node-config key or fix.
            WireError: a message that does not parse or verify.
        """
        raw = content.get("canaries")
        if raw is None:
            return None
        o = self.options
        if not o.allow_audit_canaries:
            raise PolicyError(
                f"canaries: round {rnd} assigns this site audit canaries, whose scores would "
                "leave it outside secure aggregation; this site refuses them (opt in with "
                "--node-config allow-audit-canaries=true)"
            )
        if not (cfg.canaries.enabled and cfg.dp.level == "record"):
            raise PolicyError(
                f"canaries: round {rnd} assigns gradient canaries, but the experiment this site "
                f"accepted has canaries.enabled: {cfg.canaries.enabled}, dp.level: "
                f"{cfg.dp.level!r} (gradient canaries need both canaries.enabled: true and "
                "dp.level: record at setup)"
            )
        a = decode_assignment(
            raw, self._identity()[1].server, bytes.fromhex(run.run_id), rnd, self.cid
        )
        cap = min(o.max_audit_canaries, cfg.canaries.m)
        if len(a) > cap:
            raise PolicyError(
                f"canaries: round {rnd} assigns this site {len(a)} canaries, above its cap {cap} "
                f"(--node-config max-audit-canaries={o.max_audit_canaries}, canaries.m="
                f"{cfg.canaries.m}); each canary releases one coordinate of its gradient sums "
                "(lower canaries.m, or the site raises max-audit-canaries)"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        for i, off in zip(a.param_index.tolist(), a.offset.tolist(), strict=True):
            if not (i < len(params) and params[i].dim() >= 2 and off < params[i].numel()):
                what = (f"shape {tuple(params[i].shape)}" if i < len(params)
                        else f"of {len(params)} trainable tensors")
                raise PolicyError(
                    f"canaries: round {rnd}: coordinate (parameter {i}, offset {off}) is not "
                    f"an entry of a weight tensor (ndim >= 2; parameter {i}: {what}); this site "
                    "accepts canaries on weight coordinates only (the coordinator must draw them "
                    "with GradientCanaries)"
                )
        distinct = len(np.unique(np.stack([a.param_index, a.offset], axis=1), axis=0))
        if distinct != len(a):
            raise PolicyError(
                f"canaries: round {rnd}: {len(a) - distinct} duplicate "
                "coordinate(s); every canary must be a distinct coordinate (a coordinate "
                "repeated k times would be inserted k C at once, more than one record's clip)"
            )
        digest = hashlib.sha256(b"".join(
            np.ascontiguousarray(v).tobytes()
            for v in (a.param_index, a.offset, a.signs, a.included.astype(np.uint8))
        )).hexdigest()
        if run.canaries_sha256 and digest != run.canaries_sha256:
            raise PolicyError(
                f"canaries: round {rnd} assigns this site a canary set other than the one it "
                f"trained with earlier in run {run.run_id} (SHA-256 {digest[:16]}..., pinned "
                f"{run.canaries_sha256[:16]}...); a run's canaries are fixed, so a coordinator "
                "may not move them to read other coordinates of this site's gradients"
            )
        run.canaries_sha256 = digest  # persisted with the trained round, before any reply
        return ClientCanaries(
            a.param_index, a.offset, a.signs, a.included, a.sample_key, model,
            sample_rate_for(cfg.client, num_examples), float(cfg.dp.max_grad_norm),
        )

    def _trained_reply(
        self, rnd: int, run: RunRecord, reply: bytes | Mapping[str, bytes], keys: list[str],
        update: Any, privacy: Any, canaries: ClientCanaries | None = None,
    ) -> dict[str, Any]:
        """Keep the round's private strategy state pending and build the training reply (with
        the round's canary scores, signed, when the round assigned canaries). ``reply``: the
        masking reply, or cohort -> reply of a multi-session round (``secagg.<cohort>``)."""
        if update.new_state:
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in update.new_state.items()}, buf)
            atomic_write_bytes(
                self.options.state_dir / PENDING_STATE_FILE, buf.getvalue(), mode=0o600
            )
        # nothing computed from the site's data leaves it outside DP and secure aggregation:
        # no loss, no step count (public: it follows from the config and #examples)
        out: dict[str, Any] = {
            "status": "trained",
            "round": rnd,
            "run_id": run.run_id,
            "vector_keys": keys,
        }
        if isinstance(reply, Mapping):
            out.update({f"secagg.{name}": r for name, r in sorted(reply.items())})
        else:
            out["secagg"] = reply
        if privacy is not None:
            out["epsilon"] = float(privacy.ledger.epsilon(self.cid))
        if canaries is not None:  # post-processing of the charged DP-SGD steps (audit only)
            out["canary_scores"] = encode_scores(
                self._identity()[0], bytes.fromhex(run.run_id), rnd, self.cid, canaries.scores
            )
        return out

    def fedddpm_phase0(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """FedDDPM phase 0 (the site opted in at setup): pre-train a local model from the
        broadcast initial model under DP-SGD, charged to this site's ledger (phase ``pretrain``,
        round 0) and persisted before anything leaves; then upload ``aux_images`` samples of it
        (with their labels) or the model itself. Once per run, before any round."""
        who = "coordinator"
        cfg = self._experiment()
        if not cfg.fedddpm.enabled:
            raise WireError(f"{who}: a FedDDPM phase 0 for an experiment without fedddpm")
        record = self._record()
        run = self._current_run(record, content)
        if run.phase0_done or run.last_trained_round > 0:
            raise PolicyError(
                f"phase 0: already run in run {run.run_id} (or a round was trained); a site "
                "pre-trains and uploads once per run"
            )
        n_i = get_int(content, "aux_images", who, minimum=0)
        if n_i > cfg.fedddpm.aux_total:
            raise WireError(
                f"{who}: aux_images: {n_i} is above fedddpm.aux_total {cfg.fedddpm.aux_total}"
            )
        shape = content.get("image_shape")
        if not (isinstance(shape, list) and len(shape) == 3):
            raise WireError(f"{who}: image_shape: expected 3 integers, got {shape!r}")
        num_classes = get_int(content, "num_classes", who, minimum=1)
        data = self.load_data(cfg)
        if record.dp_plan is not None:
            _check_dp_pin(record.dp_plan, dp_plan_fields(cfg, len(data)), "phase 0")
        dev = resolve_device(self.options.device)
        model = build_model(cfg, (shape[0], shape[1], shape[2]), num_classes).to(dev)

        init = decode_vector(get_bytes(content, "broadcast.params", who), num_params(model), who,
                             "broadcast.params")
        privacy = self._bind_run_noise(self._privacy(cfg, data), cfg, run)
        histograms = np.zeros((cfg.federation.num_clients, num_classes), dtype=np.int64)
        labels = data.labels.cpu().numpy().astype(np.int64)
        histograms[self.cid] = np.bincount(labels, minlength=num_classes)[:num_classes]
        # persisted before the upload can leave (the ledger is charged inside phase 0)
        run.phase0_done = True
        save_site_record(self.options.state_dir, record)
        uploads: dict[int, torch.Tensor] = {}
        schedule = NoiseSchedule.from_config(cfg.diffusion).to(dev)
        aux, meta = build_auxiliary_set(
            cfg, model, schedule, [SimClient(self.cid, data)], init, num_classes, histograms, dev,
            privacy if cfg.dp.level == "record" else None,
            trainer=build_trainer(cfg, model, schedule, dev), derive=derive_seed, alloc=[n_i],
            uploads=uploads,
        )
        if cfg.fedddpm.upload == "model":  # the DP model itself; the coordinator samples it
            upload = encode_vector(uploads[self.cid])
        else:  # the DP synthetic images and their labels
            buf = io.BytesIO()
            np.savez(buf, images=aux.images.numpy().astype(np.float32),
                     labels=aux.labels.numpy().astype(np.int64))
            upload = buf.getvalue()
        mine = meta.get("clients", {}).get(str(self.cid), {})
        out: dict[str, Any] = {
            "status": "uploaded", "round": 0, "run_id": run.run_id, "upload": upload,
            # public facts only: no pre-training loss (a statistic of the data outside DP)
            "meta": json.dumps({k: mine[k] for k in ("aux_images", "pretrain_steps",
                                                      "class_counts") if k in mine}),
        }
        if privacy is not None:
            out["epsilon"] = float(privacy.ledger.epsilon(self.cid))
        return out

    def _ckks_client(self, cfg: ExperimentConfig, run_id: str = "") -> Any:
        """This site's CKKS role: the shared secret context (``keys-dir/ckks_secret.ctx``,
        0600, with the experiment's parameters) and its own roster signing key; each value it
        encrypts is at most the modulus' capacity shared among ``num_clients`` sites."""
        # lazy: CKKS imports TenSEAL (optional heavy extension); only CKKS runs load it
        from securefed.secagg.ckks import (
            SECRET_CONTEXT_FILE,
            CKKSClient,
            context_params,
            load_ckks_context,
        )

        path = self.options.keys_dir / SECRET_CONTEXT_FILE
        if not path.is_file():
            raise NodeConfigError(
                f"--node-config keys-dir: {self.options.keys_dir} has no {SECRET_CONTEXT_FILE}; "
                "copy the secret context written by `securefed keys init --ckks` there (0600)"
            )
        ctx = load_ckks_context(path)
        got = context_params(ctx)
        sa = cfg.secure_aggregation
        want = (sa.ckks_poly_modulus_degree, tuple(sa.ckks_coeff_mod_bit_sizes),
                sa.ckks_scale_bits)
        if (got.poly_modulus_degree, tuple(got.coeff_mod_bit_sizes), got.scale_bits) != want:
            raise PolicyError(
                f"secure_aggregation.ckks_*: the experiment asks for {want}, this site's "
                f"{SECRET_CONTEXT_FILE} holds {got}"
            )
        key = self._identity()[0]
        return CKKSClient(self.cid, ctx, key,
                          max_abs=got.max_abs_sum() / cfg.federation.num_clients,
                          session=bytes.fromhex(run_id))  # every signature names the run

    def _ckks_round_clip(
        self, cfg: ExperimentConfig, record: SiteRecord, run: RunRecord, rnd: int,
        content: Mapping[str, Any],
    ) -> None:
        """CKKS with adaptive clipping: take round ``rnd``'s clip norm ``S`` from the broadcast
        (``broadcast.clip = [S, beta]``, float32), check it and record it (``round_clips``)
        before training, as the masking path does at its round start.

        A site that decrypted round ``rnd - 1`` derived ``S`` itself from that sum
        (:meth:`_derive_next_clip`): it accepts only that value or, if the coordinator
        abandoned round ``rnd - 1`` after the decryption, that round's own ``S`` (the
        simulation leaves ``S`` unchanged when a round is abandoned), at float32 precision
        (relative ``1e-6``); anything else is refused naming ``broadcast.clip``. Any other site
        takes ``S`` from the honest-but-curious coordinator; every site recomputes ``beta`` at
        ``S`` and refuses another one (:func:`_check_clip`, in :meth:`_train`)."""
        clip = self._adaptive_clip(cfg, content)
        if clip is None:
            return
        _refuse_trained(run, rnd)  # a replay must not overwrite the round's recorded S
        derived = run.derived_clips.get(rnd)
        if derived is not None:
            kept = run.round_clips.get(rnd - 1)  # round rnd - 1 abandoned after decryption
            allowed = [derived] if kept is None else [derived, kept]
            if not any(abs(clip - float(np.float32(w))) <= 1e-6 * w for w in allowed):
                raise PolicyError(
                    f"round {rnd}: broadcast.clip: clip norm {clip!r} is not the {derived!r} "
                    f"this site derived from round {rnd - 1}'s sum, which it decrypted"
                    + ("" if kept is None else
                       f" (nor round {rnd - 1}'s own {kept!r}, kept if that round was abandoned)")
                    + "; refusing to train (dp.adaptive_clipping: the coordinator must move the "
                    "clip norm by the released unclipped count, Andrew et al. 2021)"
                )
        run.round_clips[rnd] = clip  # the round's noise plan, persisted before training
        save_site_record(self.options.state_dir, record)

    def _derive_next_clip(
        self, cfg: ExperimentConfig, run: RunRecord, rnd: int, total: np.ndarray,
        contributors: int,
    ) -> float | None:
        """CKKS key holder with adaptive clipping: the next round's clip norm from round
        ``rnd``'s decrypted sum, as :meth:`ClientLevelDP.aggregate` moves it (Andrew et al.
        2021, Eq. 3), from this site's own ``S`` and ``beta`` of the round.

        ``total`` is the ``[D + 2]`` packed sum (delta, clipped-below bit, weight:
        :func:`~securefed.strategies.pack_update` of ``ClientLevelDPClient``'s vectors), so the
        bit's sum is ``total[-2]``; ``contributors``: the number of sites in the sum. None when
        the round has no adaptive clip bit."""
        if cfg.dp.level != "client" or not cfg.dp.adaptive_clipping:
            return None
        clip, beta = run.round_clips.get(rnd), run.round_bit_scales.get(rnd)
        if clip is None or beta is None or not beta > 0 or total.shape[0] < 3:
            return None
        frac = unclipped_fraction(float(total[-2]), beta, contributors)
        return geometric_clip_update(
            clip, frac, cfg.dp.target_unclipped_quantile, cfg.dp.clip_learning_rate
        )

    def ckks_upload(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """CKKS round (the site opted in): check the round (replay, cohort; with adaptive
        clipping the round's clip norm, :meth:`_ckks_round_clip`), train under DP (charged and
        persisted first), then upload the signed ciphertexts of the update."""
        who = "coordinator"
        cfg = self._experiment()
        record = self._record()
        run = self._current_run(record, content)
        rnd = get_int(content, "round", who, minimum=1)
        parts = content.get("participants")
        if not (isinstance(parts, list) and all(isinstance(c, int) for c in parts)
                and parts == sorted(set(parts)) and self.cid in parts):
            raise WireError(f"{who}: participants: a sorted list of site ids with this site")
        if len(parts) < self.options.min_cohort:
            raise PolicyError(
                f"round {rnd}: a cohort of {len(parts)} sites is below this site's min-cohort "
                f"{self.options.min_cohort} (--node-config min-cohort)"
            )
        self._ckks_round_clip(cfg, record, run, rnd, content)
        trained = self._train(content, cfg, record, run, rnd, None)
        if isinstance(trained, dict):
            return trained
        vector, keys, update, privacy, noise, hook = trained
        if noise is not None and cfg.dp.adaptive_clipping:  # to read the sum if it decrypts it
            run.round_bit_scales[rnd] = float(noise.bit_scale)
            save_site_record(self.options.state_dir, record)
        if noise is not None:  # client-level DP: this site's Gaussian share of the round's
            # noise, from a fresh CSPRNG key, added before encryption (as the simulation's CKKS)
            share = SecureGaussian().normal(
                (vector.shape[0],), noise.noise().share_std(), dtype=torch.float64
            )
            vector = vector + share.numpy()
        chunks = self._ckks_client(cfg, run.run_id).encrypt_update(rnd, vector)
        out = self._trained_reply(rnd, run, b"", keys, update, privacy, hook)
        del out["secagg"]
        out["ckks"] = pack_chunks(chunks)
        return out

    def ckks_decrypt(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """CKKS key holder: decrypt the round's aggregate once, only for a round this site
        trained in and whose sum has at least ``min-cohort`` contributors (the coordinator's
        signature on the aggregate checked, the release rounded). With adaptive clipping the
        site also derives the next round's clip norm from the sum (:meth:`_derive_next_clip`),
        recorded before the sum leaves, and holds the coordinator to it
        (:meth:`_ckks_round_clip`)."""
        who = "coordinator"
        record = self._record()
        run = self._current_run(record, content)
        cfg = self._experiment()
        rnd = get_int(content, "round", who, minimum=1)
        length = get_int(content, "length", who, minimum=1)
        contributors = content.get("contributors")
        if not (isinstance(contributors, list) and all(isinstance(c, int) for c in contributors)
                and contributors == sorted(set(contributors))):
            raise WireError(f"{who}: contributors: a sorted list of site ids")
        if run.last_trained_round != rnd or self.cid not in contributors:
            raise PolicyError(
                f"round {rnd}: this site decrypts only the sum of the round it just trained in "
                f"(last trained: {run.last_trained_round}) and contributed to"
            )
        if len(contributors) < self.options.min_cohort:
            raise PolicyError(
                f"round {rnd}: a sum of {len(contributors)} sites is below this site's "
                f"min-cohort {self.options.min_cohort}; refusing to decrypt"
            )
        if run.last_decrypted_round >= rnd:
            raise PolicyError(
                f"round {rnd}: this site already decrypted round {run.last_decrypted_round}'s "
                "aggregate; a second decryption would make it a decryption oracle"
            )
        run.last_decrypted_round = rnd  # persisted before anything is decrypted
        save_site_record(self.options.state_dir, record)
        chunks = unpack_chunks(get_bytes(content, "aggregate", who), who, "aggregate")
        total = self._ckks_client(cfg, run.run_id).decrypt_aggregate(
            rnd, length, chunks, self._identity()[1].server
        )
        nxt = self._derive_next_clip(cfg, run, rnd, total, len(contributors))
        if nxt is not None:  # checked against the next round's broadcast (_ckks_round_clip)
            run.derived_clips[rnd + 1] = nxt
            save_site_record(self.options.state_dir, record)
        return {"status": "ok", "round": rnd, "run_id": run.run_id,
                "sum": total.astype("<f8").tobytes()}

    def train_and_advertise(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Stage ``advertise_keys``: check the round against the site's policy, train locally
        (DP), charge the ledger, record the round as trained, mask nothing yet: answer the
        round's :class:`RoundStart` with this site's advertised keys."""
        who = "coordinator"
        cfg = self._experiment()
        if _usplit(cfg):
            return self.usplit_train(content, cfg)
        record = self._record()
        run = self._current_run(record, content)
        rnd = get_int(content, "round", who, minimum=1)
        opening = get_bytes(content, "secagg", who)
        clip = self._adaptive_clip(cfg, content)
        plan, params = self._round_start(opening, rnd, run, cfg, clip)
        if clip is not None:  # the round's noise plan at its later stages
            run.round_clips[rnd] = clip
            save_site_record(self.options.state_dir, record)
        trained = self._train(content, cfg, record, run, rnd, plan)
        if isinstance(trained, dict):
            return trained
        vector, keys, update, privacy, _, hook = trained
        key, roster = self._identity()
        client = MaskingClient(self.cid, rnd, params, key, roster, vector)
        reply = client.handle(opening)
        save_round_state(self.options.state_dir, client.state, vector)
        return self._trained_reply(rnd, run, reply, keys, update, privacy, hook)

    def advertise_ahead(
        self, content: Mapping[str, Any], run: RunRecord, cfg: ExperimentConfig
    ) -> dict[str, Any]:
        """The next round's :class:`RoundStart`, carried with this round's unmasking request:
        checked exactly as :meth:`train_and_advertise` checks it (signature, run, replay,
        cohort), answered with fresh keys; the site trains later, when the round's key
        broadcast arrives with the global model (:meth:`train_and_share`)."""
        who = "coordinator"
        if cfg.dp.level == "client" and cfg.dp.adaptive_clipping:
            raise WireError(f"{who}: a round start ahead of its clip norm (adaptive clipping)")
        nrnd = get_int(content, "next_round", who, minimum=1)
        opening = get_bytes(content, "next_secagg", who)
        _plan, params = self._round_start(opening, nrnd, run, cfg)
        key, roster = self._identity()
        client = MaskingClient(self.cid, nrnd, params, key, roster)
        reply = client.handle(opening)
        save_round_state(self.options.state_dir, client.state, None)
        return {"next_round": nrnd, "next_secagg": reply}

    def train_and_share(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Stage ``share_keys`` of a round whose keys this site advertised ahead: the key
        broadcast arrives with the global model; train (DP, charged and persisted, as in
        :meth:`train_and_advertise`), then answer with the encrypted shares."""
        who = "coordinator"
        cfg = self._experiment()
        if _usplit(cfg):
            return self.usplit_train_and_share(content, cfg)
        record = self._record()
        run = self._current_run(record, content)
        rnd = get_int(content, "round", who, minimum=1)
        state, stored = load_round_state(
            self.options.state_dir, self.cid, rnd, self._round_params(cfg, run, rnd)
        )
        if state.stage != Stage.ADVERTISE_KEYS or stored is not None or state.plan is None:
            raise WireError(
                f"{who}: a training key broadcast for round {rnd}, but this site's round state "
                f"is at stage {state.stage!r}; it trains a round once"
            )
        check_round_policy(state.plan, self.options)
        trained = self._train(content, cfg, record, run, rnd, state.plan)
        if isinstance(trained, dict):
            return trained
        vector, keys, update, privacy, _, hook = trained
        params = self._round_params(cfg, run, rnd)(
            len(state.plan.participants), state.plan.vector_length
        )
        key, roster = self._identity()
        client = MaskingClient(self.cid, rnd, params, key, roster, vector)
        client.state = state
        reply = client.handle(get_bytes(content, "secagg", who))
        save_round_state(self.options.state_dir, client.state, vector)
        return self._trained_reply(rnd, run, reply, keys, update, privacy, hook)

    def masking_step(self, stage: str, content: Mapping[str, Any]) -> dict[str, Any]:
        """Stages after ``advertise_keys``: one server message in, one signed reply out. A key
        broadcast that carries the global model trains first (:meth:`train_and_share`); an
        unmasking request that carries the next round's start is answered with this site's
        keys for it too (:meth:`advertise_ahead`)."""
        if stage not in Stage.ORDER[1:]:
            raise WireError(f"coordinator: unknown masking stage {stage!r}")
        if stage == Stage.SHARE_KEYS and "broadcast_keys" in content:
            return self.train_and_share(content)
        cfg = self._experiment()
        run = self._current_run(self._record(), content)
        rnd = get_int(content, "round", "coordinator", minimum=1)
        if _usplit(cfg):
            return self.usplit_step(stage, content, cfg, run, rnd)
        params = run_masking_params(cfg, run.run_id)
        data = get_bytes(content, "secagg", "coordinator")
        if stage in (Stage.CONSISTENCY_CHECK, Stage.UNMASKING):
            req = decode_message(data, self.cid, params.session)
            if (
                isinstance(req, ConsistencyRequest | UnmaskRequest)
                and len(req.survivors) < self.options.min_cohort
            ):
                raise PolicyError(
                    f"round {rnd}: a survivor set of {len(req.survivors)} sites "
                    f"{list(req.survivors)} is below this site's min-cohort "
                    f"{self.options.min_cohort} (--node-config min-cohort); refusing to unmask"
                )
        state, vector = load_round_state(
            self.options.state_dir, self.cid, rnd, self._round_params(cfg, run, rnd)
        )
        if state.plan is not None:
            params = self._round_params(cfg, run, rnd)(
                len(state.plan.participants), state.plan.vector_length
            )
        key, roster = self._identity()
        client = MaskingClient(self.cid, rnd, params, key, roster, vector)
        client.state = state
        reply = client.handle(data)
        out: dict[str, Any] = {"status": "ok", "round": rnd, "run_id": run.run_id, "secagg": reply}
        if stage == Stage.UNMASKING:
            clear_round_state(self.options.state_dir)
            if "next_secagg" in content:
                try:
                    out.update(self.advertise_ahead(content, run, cfg))
                except (WireError, PolicyError, ProtocolError) as exc:
                    # this round's shares are out either way; the next round goes without us
                    out["next_refused"] = f"{type(exc).__name__}: {exc}"
                    log.warning("%s: refused the next round's start: %s", self.who, exc)
        else:
            masked = Stage.index(stage) >= Stage.index(Stage.MASKED_INPUT)
            save_round_state(self.options.state_dir, client.state, None if masked else vector)
        return out

    # ------------------------------------------------------------------ FedDiffuse usplit
    def _usplit_starts(
        self, content: Mapping[str, Any], cfg: ExperimentConfig, run: RunRecord, rnd: int,
        *, ahead: bool = False,
    ) -> tuple[list[int], dict[str, tuple[bytes, bytes, MaskingPlan, Any]]]:
        """Check a usplit round before anything is spent on it: the round's client list, this
        site's segments recomputed from it (:func:`~securefed.strategies.feddiffuse.
        pair_clients` on the experiment's ``(seed, USPLIT, round)`` stream), and one signed
        :class:`RoundStart` per session the pairing puts the site in, each verified under its
        own session (:func:`~securefed.deploy.common.cohort_session`: run id, cohort, round
        clients), whose participants must be exactly that cohort and pass the site's policy
        (``min-cohort``, ``min-threshold``). Returns ``(round clients, cohort -> (opening,
        session, plan, params))``. ``ahead``: the next round's starts carried by this round's
        unmasking request (``next_round_clients``, ``next_secagg.<cohort>``).

        Raises:
            PolicyError: an assignment, cohort or participant list other than the pairing's,
                or a session the site's policy refuses (naming the field and node-config key).
            ProtocolError / WireError: a RoundStart that does not verify in its session.
        """
        who = "coordinator"
        _refuse_trained(run, rnd)
        clients_field = "next_round_clients" if ahead else "round_clients"
        prefix = "next_secagg." if ahead else "secagg."
        clients = content.get(clients_field)
        if not (isinstance(clients, list) and clients and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < cfg.federation.num_clients
            for c in clients
        ) and len(set(clients)) == len(clients)):
            raise WireError(
                f"{who}: {clients_field}: expected distinct client ids below "
                f"federation.num_clients={cfg.federation.num_clients}, got {clients!r}"
            )
        clients = sorted(int(c) for c in clients)
        if self.cid not in clients:
            raise PolicyError(f"{clients_field}: round {rnd}'s clients {clients} do not include "
                              f"this site ({self.cid})")
        assignment = _usplit_pairing(cfg, rnd, clients)
        mine = sorted(assignment[self.cid])
        sent = sorted(k.split(".", 1)[1] for k in content if k.startswith(prefix))
        if sent != mine:
            raise PolicyError(
                f"{prefix[:-1]}: round {rnd} asks this site to send segment(s) {sent}, but "
                f"pairing the round's clients {clients} from the experiment's seed {cfg.seed} "
                f"(feddiffuse.variant: usplit, pair_clients) assigns it {mine}; refusing the "
                "round (a coordinator may not choose which segment a site sends)"
            )
        clip = None if ahead else self._adaptive_clip(cfg, content)
        out: dict[str, tuple[bytes, bytes, MaskingPlan, Any]] = {}
        for name in mine:
            field_name = f"{prefix}{name}"
            opening = get_bytes(content, field_name, who)
            session = cohort_session(run.run_id, name, clients)
            start = decode_message(opening, self.cid, session)
            if not (isinstance(start, RoundStart) and start.round_id == rnd
                    and start.recipient == self.cid):
                raise WireError(f"{who}: {field_name}: not this site's RoundStart of round {rnd}")
            if not verify_encoded(opening, self._identity()[1].server, session):
                raise ProtocolError(
                    self.cid, "signature", f"{field_name}: RoundStart of round {rnd} does not "
                    f"verify in session {name!r} of run {run.run_id} (round clients {clients})"
                )
            members = sorted(c for c, segs in assignment.items() if name in segs)
            if sorted(start.participants) != members:
                raise PolicyError(
                    f"{field_name}: round {rnd}'s {name!r} session lists participants "
                    f"{sorted(start.participants)}, but the pairing of the round's clients "
                    f"assigns {name!r} to {members}; refusing the round"
                )
            try:
                params = dataclasses.replace(
                    round_masking_params(cfg, run.run_id, len(members), start.vector_length,
                                         clip),
                    session=session,
                )
                plan = plan_round(params, rnd, members, start.vector_length)
            except ValueError as exc:
                raise WireError(f"{who}: {field_name}: round {rnd} cannot run: {exc}") from None
            try:
                check_round_policy(plan, self.options)
            except PolicyError as exc:
                raise PolicyError(f"{field_name} (session {name!r}): {exc}") from None
            out[name] = (opening, session, plan, params)
        return clients, out

    def usplit_train(self, content: Mapping[str, Any], cfg: ExperimentConfig) -> dict[str, Any]:
        """Stage ``advertise_keys`` of a FedDiffuse ``usplit`` round: two masking sessions
        (``front``, ``back``) in the same messages. The site checks the round
        (:meth:`_usplit_starts`), trains ONCE (charged once, as in the simulation), and runs
        one masking client per session it is in (the odd site: both), each on its segment's
        packed vector (the segment's delta and the weight), each with its own round state
        (``secagg/round.<cohort>.json``, 0600). Replies ``secagg.<cohort>`` per session."""
        who = "coordinator"
        record = self._record()
        run = self._current_run(record, content)
        rnd = get_int(content, "round", who, minimum=1)
        clients, starts = self._usplit_starts(content, cfg, run, rnd)
        any_plan = next(iter(starts.values()))[2]
        trained = self._train(content, cfg, record, run, rnd, any_plan, round_clients=clients)
        if isinstance(trained, dict):
            return trained
        _, keys, update, privacy, _, hook = trained
        want = sorted(f"delta.{name}" for name in starts)
        if keys != want:  # pragma: no cover - the strategy was assigned from the same pairing
            raise RuntimeError(f"{self.who}: round {rnd}: trained vectors {keys}, not {want}")
        key, roster = self._identity()
        clear_round_state(self.options.state_dir)  # a previous round's sessions, if any
        replies: dict[str, bytes] = {}
        for name, (opening, session, _plan, params) in starts.items():
            k = f"delta.{name}"
            vector = pack_update({k: update.vectors[k]}, [k], update.weight)
            client = MaskingClient(self.cid, rnd, params, key, roster, vector)
            replies[name] = client.handle(opening)
            save_round_state(self.options.state_dir, client.state, vector, cohort=name,
                             session=session)
        return self._trained_reply(rnd, run, replies, keys, update, privacy, hook)

    def usplit_step(
        self, stage: str, content: Mapping[str, Any], cfg: ExperimentConfig, run: RunRecord,
        rnd: int,
    ) -> dict[str, Any]:
        """A stage after ``advertise_keys`` of a usplit round: each ``secagg.<cohort>`` is
        answered by that session's masking client, restored from its own round state and
        bound to its own session (read back from that state: the session the site derived
        itself when the round started). A survivor set below ``min-cohort`` is refused per
        session (``refused.<cohort>``; the site's other session goes on); every session
        refused is an error."""
        who = "coordinator"
        names = sorted(k.split(".", 1)[1] for k in content if k.startswith("secagg."))
        if not names:
            raise WireError(f"{who}: a usplit round's {stage} message carries no secagg.<cohort>")
        base = self._round_params(cfg, run, rnd)
        key, roster = self._identity()
        out: dict[str, Any] = {"status": "ok", "round": rnd, "run_id": run.run_id}
        refused: dict[str, str] = {}
        for name in names:
            session = round_session(self.options.state_dir, name)
            data = get_bytes(content, f"secagg.{name}", who)
            if stage in (Stage.CONSISTENCY_CHECK, Stage.UNMASKING):
                req = decode_message(data, self.cid, session)
                if (
                    isinstance(req, ConsistencyRequest | UnmaskRequest)
                    and len(req.survivors) < self.options.min_cohort
                ):
                    refused[name] = (
                        f"secagg.{name}: round {rnd}: a survivor set of {len(req.survivors)} "
                        f"sites {list(req.survivors)} in session {name!r} is below this site's "
                        f"min-cohort {self.options.min_cohort} (--node-config min-cohort); "
                        "refusing to unmask"
                    )
                    clear_round_state(self.options.state_dir, name)
                    continue

            def params_of(parts: int, length: int, session: bytes = session) -> Any:
                return dataclasses.replace(base(parts, length), session=session)

            state, vector = load_round_state(
                self.options.state_dir, self.cid, rnd, params_of, cohort=name
            )
            params = params_of(len(state.plan.participants), state.plan.vector_length) if (
                state.plan is not None
            ) else params_of(0, 0)
            client = MaskingClient(self.cid, rnd, params, key, roster, vector)
            client.state = state
            out[f"secagg.{name}"] = client.handle(data)
            if stage == Stage.UNMASKING:
                clear_round_state(self.options.state_dir, name)
            else:
                masked = Stage.index(stage) >= Stage.index(Stage.MASKED_INPUT)
                save_round_state(self.options.state_dir, client.state,
                                 None if masked else vector, cohort=name, session=session)
        if refused and len(refused) == len(names):
            raise PolicyError("; ".join(refused.values()))
        for name, why in refused.items():
            out[f"refused.{name}"] = why
            log.warning("%s: %s", self.who, why)
        if stage == Stage.UNMASKING and "next_round" in content:
            try:
                out.update(self.usplit_advertise_ahead(content, run, cfg))
            except (WireError, PolicyError, ProtocolError) as exc:
                # this round's shares are out either way; the next round goes without us
                out["next_refused"] = f"{type(exc).__name__}: {exc}"
                log.warning("%s: refused the next round's start: %s", self.who, exc)
        return out

    def usplit_advertise_ahead(
        self, content: Mapping[str, Any], run: RunRecord, cfg: ExperimentConfig
    ) -> dict[str, Any]:
        """The next usplit round's starts (``next_round_clients``, ``next_secagg.<cohort>``),
        carried with this round's unmasking request: checked exactly as
        :meth:`usplit_train` checks them (:meth:`_usplit_starts`: pairing, session signature,
        participants, replay, policy), answered with fresh keys per session
        (``next_secagg.<cohort>``); the site trains at the round's key broadcast
        (:meth:`usplit_train_and_share`)."""
        nrnd = get_int(content, "next_round", "coordinator", minimum=1)
        _clients, starts = self._usplit_starts(content, cfg, run, nrnd, ahead=True)
        key, roster = self._identity()
        clear_round_state(self.options.state_dir)  # this round's sessions are over
        out: dict[str, Any] = {"next_round": nrnd}
        for name, (opening, session, _plan, params) in starts.items():
            client = MaskingClient(self.cid, nrnd, params, key, roster)
            out[f"next_secagg.{name}"] = client.handle(opening)
            save_round_state(self.options.state_dir, client.state, None, cohort=name,
                             session=session)
        return out

    def usplit_train_and_share(
        self, content: Mapping[str, Any], cfg: ExperimentConfig
    ) -> dict[str, Any]:
        """Stage ``share_keys`` of a usplit round whose keys this site advertised ahead: the
        key broadcast of each session arrives with the global model and the round's client
        list, which must be the list the site's stored sessions are bound to (the one it
        checked the pairing against); the site trains once (as :meth:`usplit_train`) and
        answers each session's key broadcast with its encrypted shares."""
        who = "coordinator"
        record = self._record()
        run = self._current_run(record, content)
        rnd = get_int(content, "round", who, minimum=1)
        _refuse_trained(run, rnd)
        clients = content.get("round_clients")
        if not (isinstance(clients, list) and all(
            isinstance(c, int) and not isinstance(c, bool) for c in clients
        )):
            raise WireError(f"{who}: round_clients: expected a list of client ids")
        clients = sorted(clients)
        names = sorted(k.split(".", 1)[1] for k in content if k.startswith("secagg."))
        mine = sorted(_usplit_pairing(cfg, rnd, clients).get(self.cid, ()))
        if names != mine:
            raise PolicyError(
                f"secagg: round {rnd} asks this site to send segment(s) {names}, but pairing "
                f"the round's clients {clients} from the experiment's seed {cfg.seed} "
                f"(feddiffuse.variant: usplit, pair_clients) assigns it {mine}; refusing the round"
            )
        base = self._round_params(cfg, run, rnd)
        states: dict[str, tuple[Any, bytes, Any]] = {}
        for name in names:
            session = round_session(self.options.state_dir, name)
            if session != cohort_session(run.run_id, name, clients):
                raise PolicyError(
                    f"round_clients: round {rnd}'s client list {clients} is not the one this "
                    f"site's {name!r} session was started with; refusing to train"
                )

            def params_of(parts: int, length: int, session: bytes = session) -> Any:
                return dataclasses.replace(base(parts, length), session=session)

            state, stored = load_round_state(
                self.options.state_dir, self.cid, rnd, params_of, cohort=name
            )
            if state.stage != Stage.ADVERTISE_KEYS or stored is not None or state.plan is None:
                raise WireError(
                    f"{who}: a training key broadcast for round {rnd}, but this site's "
                    f"{name!r} round state is at stage {state.stage!r}; it trains a round once"
                )
            check_round_policy(state.plan, self.options)
            params = params_of(len(state.plan.participants), state.plan.vector_length)
            states[name] = (state, session, params)
        any_plan = next(iter(states.values()))[0].plan
        trained = self._train(content, cfg, record, run, rnd, any_plan, round_clients=clients)
        if isinstance(trained, dict):
            return trained
        _, keys, update, privacy, _, hook = trained
        key, roster = self._identity()
        replies: dict[str, bytes] = {}
        for name, (state, session, params) in states.items():
            k = f"delta.{name}"
            vector = pack_update({k: update.vectors[k]}, [k], update.weight)
            client = MaskingClient(self.cid, rnd, params, key, roster, vector)
            client.state = state
            replies[name] = client.handle(get_bytes(content, f"secagg.{name}", who))
            save_round_state(self.options.state_dir, client.state, vector, cohort=name,
                             session=session)
        return self._trained_reply(rnd, run, replies, keys, update, privacy, hook)


def _usplit(cfg: ExperimentConfig) -> bool:
    """FedDiffuse ``usplit``: two masking sessions a round (``front``, ``back``)."""
    return bool(cfg.feddiffuse.enabled and cfg.feddiffuse.variant == "usplit")


def _usplit_pairing(
    cfg: ExperimentConfig, rnd: int, clients: list[int]
) -> dict[int, tuple[str, ...]]:
    """Round ``rnd``'s usplit pairing of ``clients``, from the experiment's seed (the
    simulation's ``(seed, USPLIT, round)`` stream, :func:`~securefed.strategies.feddiffuse.
    pair_clients`)."""
    return pair_clients(clients, np.random.default_rng(derive_seed(cfg.seed, Purpose.USPLIT, rnd)))


def _feddiffuse_layer(strategy: Any) -> FedDiffuse:
    """The :class:`~securefed.strategies.feddiffuse.FedDiffuse` layer of a strategy stack."""
    layer = find_layer(strategy, FedDiffuse)
    if layer is None:  # pragma: no cover - build_strategy_stack wraps it
        raise TypeError("feddiffuse.enabled: the strategy stack has no FedDiffuse layer")
    return layer


def dispatch(site: Site, message_type: str, content: Mapping[str, Any]) -> dict[str, Any]:
    """Route one coordinator message to the site's handler (used by the ClientApp)."""
    if message_type == MESSAGE_SETUP:
        return site.setup(content)
    if message_type == MESSAGE_PHASE0:
        return site.fedddpm_phase0(content)
    if message_type == MESSAGE_CKKS_UPLOAD:
        return site.ckks_upload(content)
    if message_type == MESSAGE_CKKS_DECRYPT:
        return site.ckks_decrypt(content)
    category, _, action = message_type.partition(".")
    if category == "train" and action == Stage.ADVERTISE_KEYS:
        return site.train_and_advertise(content)
    if category == "train" and action in Stage.ORDER:
        return site.masking_step(action, content)
    raise WireError(f"coordinator: unknown message type {message_type!r}")
