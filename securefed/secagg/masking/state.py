"""Per-party protocol state of the masking protocol (Bonawitz et al. 2017, Fig. 4).

:class:`ClientState` holds one client's secrets and progress through a round;
:class:`ServerState` the server's view (the survivor sets U1..U4 and the messages it kept), which
never includes an individual unmasked input. The state machines that update them are
:class:`~securefed.secagg.masking.client.MaskingClient` and
:class:`~securefed.secagg.masking.server.MaskingServer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefed.secagg.masking.messages import AdvertiseKeys, ShareKeys, Stage, UnmaskShares
from securefed.secagg.masking.plan import MaskingPlan

__all__ = [
    "ClientState",
    "ServerState",
]


@dataclass
class ClientState:
    """One client's protocol state (Bonawitz et al. 2017, Fig. 4, client side).

    ``stage`` is the stage the client is in: it has answered the server message that opens it.
    Secrets (``c_secret``, ``s_secret``, ``b_seed``) never leave this object except as Shamir
    shares under AEAD; the input vector is dropped as soon as the masked input is built.
    """

    client_id: int
    round_id: int
    stage: str | None = None
    plan: MaskingPlan | None = None
    c_secret: X25519PrivateKey | None = None
    s_secret: X25519PrivateKey | None = None
    peer_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # U1 neighbours
    share_keys: dict[int, bytes] = field(default_factory=dict)  # AEAD key per peer
    b_seed: bytes | None = None
    held_shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # v -> (b, s)
    masked_with: tuple[int, ...] = ()  # U2 neighbours
    survivors: tuple[int, ...] | None = None  # the U3 this client signed
    revealed_b: set[int] = field(default_factory=set)
    revealed_s: set[int] = field(default_factory=set)


@dataclass
class ServerState:
    """The server's protocol state (Bonawitz et al. 2017, Fig. 4, server side).

    It only ever holds masked vectors folded into one running sum, never an individual input.
    """

    plan: MaskingPlan
    stage: str = Stage.ADVERTISE_KEYS
    advertised: dict[int, AdvertiseKeys] = field(default_factory=dict)  # U1
    advertised_raw: dict[int, bytes] = field(default_factory=dict)
    shared: dict[int, ShareKeys] = field(default_factory=dict)  # U2
    u1: tuple[int, ...] = ()
    u2: tuple[int, ...] = ()
    u3: tuple[int, ...] = ()
    u4: tuple[int, ...] = ()
    masked_from: list[int] = field(default_factory=list)
    consistency: dict[int, bytes] = field(default_factory=dict)
    unmask: dict[int, UnmaskShares] = field(default_factory=dict)
    pruned: set[int] = field(default_factory=set)
