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
=================  ==========================================================================

Every handler re-derives what it needs from the node config, the experiment the coordinator
sent at setup (kept in ``state-dir``) and the files in ``state-dir``, so a fresh process per
message (Flower's ``flwr-clientapp``) works. The long-lived site worker
(:mod:`securefed.deploy.worker`) keeps one :class:`Site` per node config: it memoises the
parsed experiment, the site's data and its keys (each keyed by what it was derived from), never
the ledger or the round state, which stay on disk and are written before a reply leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from securefed.config import ConfigError, ExperimentConfig, dump_config, parse_config
from securefed.deploy.common import (
    DeployConfigError,
    check_deployable,
    masking_params,
    roster_digest,
)
from securefed.deploy.state import clear_round_state, load_round_state, save_round_state
from securefed.deploy.wire import (
    MESSAGE_SETUP,
    PROTOCOL_VERSION,
    WireError,
    decode_vector,
    get_bytes,
    get_int,
    get_str,
)
from securefed.io import atomic_write_bytes, atomic_write_text
from securefed.secagg.masking.stages import Stage

if TYPE_CHECKING:  # torch, data and strategies load only in the stages that train
    import torch

    from securefed.data import ImageDataset
    from securefed.strategies import ClientUpdate, Strategy

__all__ = [
    "NodeConfigError",
    "NodeOptions",
    "Site",
    "client_round_update",
    "dispatch",
]

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"
CLIENT_STATE_FILE = "client_state.pt"
PENDING_STATE_FILE = "client_state.pending.pt"


class NodeConfigError(ValueError):
    """A bad ``--node-config`` entry; names the key, the value and the fix."""


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

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeOptions:
        """Parse and validate ``--node-config``.

        Raises:
            NodeConfigError: naming the key, the value and the fix.
        """
        known = {
            "state-dir", "keys-dir", "client-id", "partition-id", "data-path", "device",
            "require-dp", "max-epsilon",
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
        return cls(
            state_dir=Path(str(state_dir)).expanduser(),
            keys_dir=Path(str(keys_dir)).expanduser(),
            client_id=cid,
            partition_id=pid,
            data_path=None if data_path is None else Path(str(data_path)).expanduser(),
            device=device,
            require_dp=_as_bool(node_config, "require-dp", True),
            max_epsilon=max_eps,
        )


def client_round_update(
    cfg: ExperimentConfig,
    strategy: Strategy,
    trainer: Any,
    cid: int,
    data: ImageDataset,
    broadcast: Mapping[str, torch.Tensor],
    client_state: Mapping[str, torch.Tensor],
    rnd: int,
    privacy: Any | None,
) -> tuple[ClientUpdate, Any]:
    """One client's local step of round ``rnd``, exactly as the simulation runs it.

    Seeds, the DP-SGD call, the ledger charge (persisted BEFORE the update is returned, so before
    it can leave the site) and the strategy's client hook are those of
    :meth:`securefed.federation.simulation.Simulation.run_round`.

    Returns:
        ``(ClientUpdate, LocalResult)``.
    """
    # the simulation's seed purpose for local training: same stream, same model
    from securefed.federation.simulation import _TRAIN, derive_seed

    strategy.set_current_client(cid)
    start = strategy.start_params(broadcast, client_state)
    objective = strategy.local_objective(broadcast, client_state)
    seed = derive_seed(cfg.seed, rnd, _TRAIN, cid)
    if privacy is not None and privacy.level == "record":
        from securefed.client.dp import DPLocalTrainer

        if not isinstance(trainer, DPLocalTrainer):  # pragma: no cover - wiring error
            raise TypeError("DP run without a DP trainer")
        result = trainer.train_private(
            data,
            start,
            objective,
            seed,
            noise_multiplier=privacy.noise_multipliers[cid],
            noise_source=privacy.noise_source(rnd, cid),
        )
        # charged and persisted BEFORE the update can leave the site
        privacy.ledger.charge(cid, phase="round", round=rnd, steps=result.steps)
    else:
        result = trainer.train(data, start, objective, seed=seed)
    update = strategy.client_update(
        broadcast, result.params, result.num_examples, result.steps, cfg.client.lr, client_state,
        result.mean_grad,
    )
    return update, result


def build_trainer(cfg: ExperimentConfig, model: torch.nn.Module, device: torch.device) -> Any:
    """The simulation's trainer for this config (DP-SGD when ``dp.level: record``)."""
    from securefed.client import LocalTrainer
    from securefed.diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_config(cfg.diffusion)
    if cfg.dp.level == "record":
        from securefed.client.dp import DPLocalTrainer

        return DPLocalTrainer(
            model, schedule, cfg.client, cfg.dp, device, cfg.model.class_conditional
        )
    return LocalTrainer(model, schedule, cfg.client, device, cfg.model.class_conditional)


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
        from securefed.data import load_dataset

        o = self.options
        if o.data_path is not None:
            if not o.data_path.is_dir():
                raise NodeConfigError(
                    f"--node-config data-path={str(o.data_path)!r}: not a folder; give the "
                    "folder holding <site>/<class>/<image> files"
                )
            data_cfg = cfg.data.model_copy(update={"name": "image_folder", "root": o.data_path})
            return load_dataset(data_cfg)
        from securefed.run import prepare_data

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
        from cryptography.hazmat.primitives import serialization

        from securefed.secagg.keys import load_client_key, load_roster

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
        if cfg.dp.level != "record":
            return None
        from securefed.federation.simulation import SimClient
        from securefed.run import build_privacy

        ledger = self.options.state_dir / "privacy_ledger.json"
        return build_privacy(
            cfg, self.options.state_dir, [SimClient(self.cid, data)], resume=ledger.exists()
        )

    # ------------------------------------------------------------------ setup
    def setup(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Accept (or refuse) the coordinator's experiment; plan this site's privacy ledger."""
        version = get_str(content, "version", "coordinator")
        if version != PROTOCOL_VERSION:
            raise WireError(
                f"{self.who}: coordinator speaks {version!r}, this site {PROTOCOL_VERSION!r}; "
                "install the same securefed version at every party"
            )
        text = get_str(content, "experiment", "coordinator")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"coordinator experiment: not valid YAML: {exc}") from None
        cfg = parse_config(raw if isinstance(raw, dict) else {})
        check_deployable(cfg)
        if self.options.require_dp and cfg.dp.level != "record":
            raise DeployConfigError(
                f"dp.level: {cfg.dp.level!r}: this site requires record-level DP "
                "(--node-config require-dp=true); the coordinator must set dp.level: record"
            )
        eps = cfg.dp.target_epsilon
        if self.options.max_epsilon is not None and cfg.dp.level == "record":
            if eps is None or eps > self.options.max_epsilon:
                raise DeployConfigError(
                    f"dp.target_epsilon: {eps} exceeds this site's max-epsilon "
                    f"{self.options.max_epsilon}; the coordinator must lower it"
                )
        if self.cid >= cfg.federation.num_clients:
            raise NodeConfigError(
                f"--node-config client-id={self.cid}: the experiment has "
                f"federation.num_clients={cfg.federation.num_clients} (ids 0..."
                f"{cfg.federation.num_clients - 1})"
            )
        self._identity()
        data = self.load_data(cfg)
        if len(data) == 0:
            raise NodeConfigError(f"{self.who}: no training examples")
        self.options.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(self.options.state_dir / EXPERIMENT_FILE, dump_config(cfg))
        privacy = self._privacy(cfg, data)
        c, h, w = data.image_shape
        reply: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "client_id": self.cid,
            "num_examples": len(data),
            "image_shape": [int(c), int(h), int(w)],
            "num_classes": int(data.num_classes),
            "roster_sha256": roster_digest(self.options.keys_dir),
        }
        if privacy is not None:
            reply["epsilon"] = float(privacy.ledger.epsilon(self.cid))
        return reply

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
        import torch

        path = self.options.state_dir / CLIENT_STATE_FILE
        if not path.exists():
            return {}
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise WireError(f"{path}: not a mapping of tensors")
        return dict(state)

    def train_and_advertise(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """Stage ``advertise_keys``: train locally (DP), charge the ledger, mask nothing yet:
        answer the round's :class:`RoundStart` with this site's advertised keys."""
        import torch

        from securefed.client.trainer import local_steps_for
        from securefed.client.update import num_params
        from securefed.run import build_model, resolve_device
        from securefed.secagg.masking.client import MaskingClient
        from securefed.strategies import build_strategy, pack_update

        who = "coordinator"
        cfg = self._experiment()
        rnd = get_int(content, "round", who, minimum=1)
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
        dev = resolve_device(self.options.device)
        model = build_model(cfg, (shape[0], shape[1], shape[2]), num_classes).to(dev)
        d = num_params(model)
        names = content.get("broadcast_keys")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise WireError(f"{who}: broadcast_keys: expected a non-empty list of names")
        broadcast = {
            n: decode_vector(get_bytes(content, f"broadcast.{n}", who), d, who, f"broadcast.{n}")
            for n in names
        }
        strategy = build_strategy(cfg.strategy, cfg.federation.num_clients, weight_scale=scale)
        privacy = self._privacy(cfg, data)
        if privacy is not None and privacy.ledger.would_exceed(
            self.cid, local_steps_for(cfg.client, len(data))
        ):
            # its next round would exceed target_epsilon: it does not train at all
            privacy.ledger.mark_exhausted(self.cid, rnd)
            clear_round_state(self.options.state_dir)
            return {"status": "budget_exhausted", "round": rnd,
                    "epsilon": float(privacy.ledger.epsilon(self.cid))}
        trainer = build_trainer(cfg, model, dev)
        client_state = self._client_state()
        update, result = client_round_update(
            cfg, strategy, trainer, self.cid, data, broadcast, client_state, rnd, privacy
        )
        keys = sorted(update.vectors)
        vector = pack_update(update.vectors, keys, update.weight)
        key, roster = self._identity()
        client = MaskingClient(self.cid, rnd, masking_params(cfg), key, roster, vector)
        reply = client.handle(get_bytes(content, "secagg", who))
        save_round_state(self.options.state_dir, client.state, vector)
        if update.new_state:
            import io

            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in update.new_state.items()}, buf)
            atomic_write_bytes(
                self.options.state_dir / PENDING_STATE_FILE, buf.getvalue(), mode=0o600
            )
        out: dict[str, Any] = {
            "status": "trained",
            "round": rnd,
            "secagg": reply,
            "mean_loss": float(result.mean_loss),
            "steps": int(result.steps),
            "vector_keys": keys,
        }
        if privacy is not None:
            out["epsilon"] = float(privacy.ledger.epsilon(self.cid))
        return out

    def masking_step(self, stage: str, content: Mapping[str, Any]) -> dict[str, Any]:
        """Stages after ``advertise_keys``: one server message in, one signed reply out."""
        from securefed.secagg.masking.client import MaskingClient

        if stage not in Stage.ORDER[1:]:
            raise WireError(f"coordinator: unknown masking stage {stage!r}")
        cfg = self._experiment()
        rnd = get_int(content, "round", "coordinator", minimum=1)
        params = masking_params(cfg)
        state, vector = load_round_state(self.options.state_dir, self.cid, rnd, params)
        key, roster = self._identity()
        client = MaskingClient(self.cid, rnd, params, key, roster, vector)
        client.state = state
        reply = client.handle(get_bytes(content, "secagg", "coordinator"))
        if stage == Stage.UNMASKING:
            clear_round_state(self.options.state_dir)
        else:
            masked = Stage.index(stage) >= Stage.index(Stage.MASKED_INPUT)
            save_round_state(self.options.state_dir, client.state, None if masked else vector)
        return {"status": "ok", "round": rnd, "secagg": reply}



def dispatch(site: Site, message_type: str, content: Mapping[str, Any]) -> dict[str, Any]:
    """Route one coordinator message to the site's handler (used by the ClientApp)."""
    if message_type == MESSAGE_SETUP:
        return site.setup(content)
    category, _, action = message_type.partition(".")
    if category == "train" and action == Stage.ADVERTISE_KEYS:
        return site.train_and_advertise(content)
    if category == "train" and action in Stage.ORDER:
        return site.masking_step(action, content)
    raise WireError(f"coordinator: unknown message type {message_type!r}")
