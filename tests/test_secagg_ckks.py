"""CKKS secure aggregation: sums, the public-only server, message authentication, key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from securefed.config import SecureAggregationConfig
from securefed.secagg import AggregationAbortedError, build_protocol
from securefed.secagg.ckks import (
    HEADER_BYTES,
    KIND_UPLOAD,
    PUBLIC_CONTEXT_FILE,
    SECRET_CONTEXT_FILE,
    CKKSAggregation,
    CKKSClient,
    CKKSContextError,
    CKKSKeyFileError,
    CKKSKeyPermissionError,
    CKKSMessageError,
    CKKSParams,
    CKKSServer,
    MessageHeader,
    ckks_error_bound,
    context_fingerprint,
    context_params,
    init_ckks_keys,
    load_ckks_context,
    make_ckks_context,
    pack_message,
    public_context_bytes,
    secret_context_bytes,
    unpack_message,
    validate_ckks_params,
)

SLOTS = 4096
NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def proto() -> CKKSAggregation:
    """One ephemeral protocol (N = 8192) shared by the module: key generation is the slow bit."""
    return CKKSAggregation.ephemeral(NUM_CLIENTS, record_transcript=True)


@pytest.fixture(scope="module")
def ctx() -> ts.Context:
    return make_ckks_context()


class Roles:
    """Clients 0..2 with known signing keys, and a server built from public bytes."""

    def __init__(self, ctx: ts.Context) -> None:
        self.ctx = ctx
        self.keys = {c: Ed25519PrivateKey.generate() for c in range(3)}
        self.clients = {c: CKKSClient(c, ctx, k) for c, k in self.keys.items()}
        self.server = CKKSServer(
            public_context_bytes(ctx),
            {c: k.public_key() for c, k in self.keys.items()},
            Ed25519PrivateKey.generate(),
        )


@pytest.fixture(scope="module")
def roles(ctx: ts.Context) -> Roles:
    return Roles(ctx)


def _flip(msg: bytes, pos: int) -> bytes:
    b = bytearray(msg)
    b[pos] ^= 0x01
    return bytes(b)


# ----------------------------------------------------------------------------- correctness


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(1, NUM_CLIENTS),
    length=st.sampled_from([1, 5, SLOTS - 1, SLOTS, SLOTS + 1, 2 * SLOTS + 17]),
    magnitude=st.sampled_from([1e-3, 1.0, 50.0]),
    drop_mask=st.integers(0, 2**NUM_CLIENTS - 1),
    seed=st.integers(0, 2**32 - 1),
)
@example(n=4, length=2 * SLOTS + 17, magnitude=1.0, drop_mask=0b0101, seed=1)
@example(n=3, length=SLOTS + 1, magnitude=50.0, drop_mask=0, seed=2)
def test_sum_matches_plaintext_within_bound(
    proto: CKKSAggregation, n: int, length: int, magnitude: float, drop_mask: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    inputs = {c: rng.uniform(-magnitude, magnitude, length) for c in range(n)}
    dropouts = {c: "upload" for c in range(n) if drop_mask >> c & 1}
    survivors = [c for c in range(n) if c not in dropouts]
    if not survivors:
        with pytest.raises(AggregationAbortedError):
            proto.aggregate(3, inputs, dropouts)
        return
    res = proto.aggregate(3, inputs, dropouts)
    exact = np.sum([inputs[c] for c in survivors], axis=0)
    err = np.max(np.abs(res.total - exact))
    assert err <= proto.error_bound(len(survivors), magnitude)
    assert res.total.dtype == np.float64 and res.total.shape == (length,)
    assert res.survivors == tuple(survivors)
    assert res.dropped == tuple(sorted(dropouts))
    chunks = -(-length // SLOTS)
    assert res.info["chunks"] == chunks
    holder = res.info["key_holder"]
    assert holder == survivors[0]
    for c in survivors:
        up = res.bytes_up[c] - (8 * length if c == holder else 0)
        assert up > chunks * 200_000  # ~235 kB per ciphertext
        assert res.bytes_down[c] == (res.info["aggregate_bytes"] if c == holder else 0)
        assert res.client_seconds[c] > 0
    assert res.server_seconds > 0


def test_dropped_client_contributes_nothing(proto: CKKSAggregation) -> None:
    big = np.full(10, 1e6)
    res = proto.aggregate(1, {0: np.ones(10), 1: big}, {1: "upload"})
    np.testing.assert_allclose(res.total, np.ones(10), atol=proto.error_bound(1, 1.0))


def test_error_bound_shape() -> None:
    raw = ckks_error_bound(1, 1.0, release_quantum=0)
    assert 1e-8 < raw < 1e-7
    assert ckks_error_bound(1, 1.0) == pytest.approx(raw + 2.0**-26)
    assert ckks_error_bound(4, 1.0, release_quantum=0) > raw
    assert ckks_error_bound(1, 1e6, release_quantum=0) > raw
    assert ckks_error_bound(1, 1.0, scale_bits=30, release_quantum=0) > 500 * raw
    with pytest.raises(ValueError, match="n must be"):
        ckks_error_bound(0, 1.0)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_raw_ckks_noise_within_bound(ctx: ts.Context, n: int) -> None:
    """The decryption error itself (before release rounding) respects the documented bound."""
    rng = np.random.default_rng(n)
    xs = rng.uniform(-1.0, 1.0, (n, SLOTS))
    acc = ts.ckks_vector(ctx, xs[0])
    for x in xs[1:]:
        acc.add_(ts.ckks_vector(ctx, x))
    err = np.max(np.abs(np.array(acc.decrypt()) - xs.sum(axis=0)))
    assert err <= ckks_error_bound(n, 1.0, release_quantum=0)
    assert err > 0  # CKKS is approximate: the bound is not vacuous


def test_released_sum_is_rounded_to_the_grid(proto: CKKSAggregation) -> None:
    """The key holder never releases the raw decryption (it would reveal the CKKS noise and,
    with the aggregate ciphertext, the secret key)."""
    q = proto.params.release_quantum
    assert q == 2.0**-25
    rng = np.random.default_rng(5)
    res = proto.aggregate(2, {0: rng.normal(size=100), 1: rng.normal(size=100)})
    steps = res.total / q
    np.testing.assert_array_equal(steps, np.round(steps))


def test_registry_and_config_ephemeral() -> None:
    proto = build_protocol(SecureAggregationConfig(protocol="ckks"), 2)
    assert isinstance(proto, CKKSAggregation)
    assert proto.name == "ckks" and proto.dropout_stages == ("upload",)
    assert proto.params == CKKSParams(8192, (60, 40, 40), 40)
    res = proto.aggregate(0, {0: np.arange(3.0), 1: np.ones(3)})
    np.testing.assert_allclose(res.total, np.arange(3.0) + 1, atol=proto.error_bound(2, 2.0))


# ----------------------------------------------------------------------------- server view


def test_server_is_public_only_and_cannot_decrypt(proto: CKKSAggregation) -> None:
    server = proto.server
    assert server.context.is_private() is False
    assert not server.context.has_secret_key()
    proto.aggregate(4, {0: np.ones(8), 1: np.ones(8)})
    transcript = proto.last_transcript
    assert transcript is not None and transcript.round_id == 4
    assert all(isinstance(m, bytes) for msgs in transcript.uploads.values() for m in msgs)
    _, ct, _, _ = unpack_message(transcript.uploads[1][0], 1)
    seen = ts.ckks_vector_from(server.context, ct)
    with pytest.raises(ValueError, match="secret"):
        seen.decrypt()
    _, agg_ct, _, _ = unpack_message(transcript.aggregate[0], "server")
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(server.context, agg_ct).decrypt()


def test_server_refuses_secret_context(ctx: ts.Context) -> None:
    with pytest.raises(CKKSContextError, match="secret key"):
        CKKSServer(secret_context_bytes(ctx), {}, Ed25519PrivateKey.generate())


def test_public_bytes_lack_secret_and_fingerprint_is_stable(ctx: ts.Context) -> None:
    pub = ts.context_from(public_context_bytes(ctx))
    assert not pub.is_private()
    reloaded = ts.context_from(secret_context_bytes(ctx))
    assert reloaded.is_private()
    fp = context_fingerprint(ctx)
    assert context_fingerprint(pub) == fp == context_fingerprint(reloaded)
    assert context_params(pub) == CKKSParams()


# ----------------------------------------------------------------------------- authentication


def _round(roles: Roles, round_id: int, length: int = 10) -> dict[int, list[bytes]]:
    roles.server.begin_round(round_id, length)
    return {c: cl.encrypt_update(round_id, np.ones(length)) for c, cl in roles.clients.items()}


def test_roles_roundtrip(roles: Roles) -> None:
    msgs = _round(roles, 9, SLOTS + 3)
    for c, m in msgs.items():
        roles.server.receive(c, m)
    agg = roles.server.finish()
    total = roles.clients[2].decrypt_aggregate(9, SLOTS + 3, agg, roles.server.verify_key)
    np.testing.assert_allclose(total, 3.0, atol=ckks_error_bound(3, 1.0))


def test_tampered_ciphertext_rejected(roles: Roles) -> None:
    msgs = _round(roles, 5)
    bad = [_flip(msgs[1][0], HEADER_BYTES + 1000)]
    with pytest.raises(CKKSMessageError, match=r"client 1: signature check") as info:
        roles.server.receive(1, bad)
    assert info.value.client == 1 and info.value.check == "signature"
    # the rejection is all-or-nothing: nothing from client 1 is in the sum
    assert 1 not in roles.server.contributors


@pytest.mark.parametrize("field_offset", [6, 14, 18, 26, 40])  # round, sender, idx, count, fp
def test_tampered_header_rejected(roles: Roles, field_offset: int) -> None:
    msgs = _round(roles, 5)
    with pytest.raises(CKKSMessageError, match=r"client 2: (signature|client) check"):
        roles.server.receive(2, [_flip(msgs[2][0], field_offset)])


def test_tampered_signature_rejected(roles: Roles) -> None:
    msgs = _round(roles, 5)
    with pytest.raises(CKKSMessageError, match="client 0: signature check"):
        roles.server.receive(0, [_flip(msgs[0][0], len(msgs[0][0]) - 3)])


def test_wrong_round_rejected(roles: Roles) -> None:
    old = roles.clients[1].encrypt_update(6, np.ones(10))
    roles.server.begin_round(7, 10)
    with pytest.raises(CKKSMessageError, match=r"client 1: round check.*round 6.*round 7"):
        roles.server.receive(1, old)


def test_unknown_and_impersonating_client_rejected(roles: Roles) -> None:
    roles.server.begin_round(8, 10)
    stranger = CKKSClient(7, roles.ctx, Ed25519PrivateKey.generate())
    with pytest.raises(CKKSMessageError, match=r"client 7: client check.*unknown"):
        roles.server.receive(7, stranger.encrypt_update(8, np.ones(10)))
    # client 0's messages replayed as if from client 1
    msgs0 = roles.clients[0].encrypt_update(8, np.ones(10))
    with pytest.raises(CKKSMessageError, match=r"client 1: client check.*from client 0"):
        roles.server.receive(1, msgs0)
    # an impostor signing as client 1 with its own key
    impostor = CKKSClient(1, roles.ctx, Ed25519PrivateKey.generate())
    with pytest.raises(CKKSMessageError, match="client 1: signature check"):
        roles.server.receive(1, impostor.encrypt_update(8, np.ones(10)))


def test_driver_rejects_unregistered_client(proto: CKKSAggregation) -> None:
    with pytest.raises(CKKSMessageError, match="client 99: client check"):
        proto.aggregate(1, {0: np.ones(3), 99: np.ones(3)})


def test_chunk_checks(roles: Roles) -> None:
    length = SLOTS + 5
    msgs = _round(roles, 3, length)
    with pytest.raises(CKKSMessageError, match="client 0: chunk_count check"):
        roles.server.receive(0, msgs[0][:1])
    with pytest.raises(CKKSMessageError, match=r"client 0: chunk_index check.*twice"):
        roles.server.receive(0, [msgs[0][0], msgs[0][0]])
    # a validly signed header announcing the wrong chunk count
    ct = unpack_message(msgs[0][0], 0)[1]
    forged = [
        pack_message(
            MessageHeader(KIND_UPLOAD, 3, 0, i, 3, length, roles.server.fingerprint),
            ct,
            roles.keys[0],
        )
        for i in range(2)
    ]
    with pytest.raises(CKKSMessageError, match=r"client 0: chunk_count check.*3 chunks"):
        roles.server.receive(0, forged)
    # a validly signed message whose ciphertext holds the wrong number of values
    short = [
        pack_message(
            MessageHeader(KIND_UPLOAD, 3, 0, i, 2, length, roles.server.fingerprint),
            ts.ckks_vector(roles.ctx, np.ones(3)).serialize(),
            roles.keys[0],
        )
        for i in range(2)
    ]
    with pytest.raises(CKKSMessageError, match="client 0: chunk_size check"):
        roles.server.receive(0, short)
    with pytest.raises(CKKSMessageError, match="client 0: format check"):
        roles.server.receive(0, [b"not a message", msgs[0][1]])
    roles.server.receive(0, msgs[0])
    with pytest.raises(CKKSMessageError, match="client 0: duplicate check"):
        roles.server.receive(0, msgs[0])


def test_mismatched_context_rejected(roles: Roles) -> None:
    other = make_ckks_context()  # same parameters, different secret key
    rogue = CKKSClient(1, other, roles.keys[1])
    roles.server.begin_round(2, 10)
    with pytest.raises(CKKSMessageError, match=r"client 1: context check.*different CKKS key"):
        roles.server.receive(1, rogue.encrypt_update(2, np.ones(10)))
    # a key holder with another key refuses the aggregate
    for c in (0, 2):
        roles.server.receive(c, roles.clients[c].encrypt_update(2, np.ones(10)))
    agg = roles.server.finish()
    with pytest.raises(CKKSMessageError, match="server: context check"):
        rogue.decrypt_aggregate(2, 10, agg, roles.server.verify_key)


def test_aggregate_tampering_rejected_by_key_holder(roles: Roles) -> None:
    msgs = _round(roles, 4)
    for c, m in msgs.items():
        roles.server.receive(c, m)
    agg = roles.server.finish()
    holder = roles.clients[0]
    with pytest.raises(CKKSMessageError, match="server: signature check"):
        holder.decrypt_aggregate(4, 10, [_flip(agg[0], HEADER_BYTES + 5)], roles.server.verify_key)
    with pytest.raises(CKKSMessageError, match="server: round check"):
        holder.decrypt_aggregate(5, 10, agg, roles.server.verify_key)
    with pytest.raises(CKKSMessageError, match="server: signature check"):
        holder.decrypt_aggregate(4, 10, agg, Ed25519PrivateKey.generate().public_key())
    # a client's upload is not an aggregate
    with pytest.raises(CKKSMessageError, match="server: sender check"):
        holder.decrypt_aggregate(4, 10, msgs[0], roles.server.verify_key)


# ----------------------------------------------------------------------------- driver errors


def test_driver_input_errors(proto: CKKSAggregation) -> None:
    with pytest.raises(ValueError, match="client 1: unknown dropout stage"):
        proto.aggregate(1, {0: np.ones(3)}, {1: "unmask"})
    with pytest.raises(ValueError, match="client 1: input contains NaN"):
        proto.aggregate(1, {0: np.ones(3), 1: np.array([1.0, np.nan, 0.0])})
    with pytest.raises(ValueError, match="client 0: magnitude check"):
        proto.aggregate(1, {0: np.full(3, 1e30)})
    with pytest.raises(AggregationAbortedError):
        proto.aggregate(1, {0: np.ones(3)}, {0: "upload"})


def test_threshold_aborts_small_sums(ctx: ts.Context) -> None:
    sec, pub = secret_context_bytes(ctx), public_context_bytes(ctx)
    by_count = CKKSAggregation(sec, pub, 4, threshold=3)
    ones = {c: np.ones(2) for c in range(4)}
    assert by_count.aggregate(0, ones, {3: "upload"}).survivors == (0, 1, 2)
    with pytest.raises(AggregationAbortedError, match="threshold is 3"):
        by_count.aggregate(1, ones, {2: "upload", 3: "upload"})
    by_fraction = CKKSAggregation(sec, pub, 4, threshold=0.5)  # of the round's clients, >= 2
    with pytest.raises(AggregationAbortedError, match="threshold is 2"):
        by_fraction.aggregate(2, {0: np.ones(2), 1: np.ones(2)}, {1: "upload"})
    assert by_fraction.aggregate(3, ones, {0: "upload", 1: "upload"}).survivors == (2, 3)
    with pytest.raises(ValueError, match=r"secure_aggregation\.threshold"):
        CKKSAggregation(sec, pub, 2, threshold=3)


def test_configured_key_holder(ctx: ts.Context) -> None:
    proto = CKKSAggregation(secret_context_bytes(ctx), public_context_bytes(ctx), 3, key_holder=2)
    res = proto.aggregate(0, {0: np.ones(4), 1: np.ones(4), 2: np.ones(4)})
    assert res.info["key_holder"] == 2 and res.bytes_down[2] > 0 and res.bytes_down[0] == 0
    with pytest.raises(AggregationAbortedError, match="key holder client 2"):
        proto.aggregate(1, {0: np.ones(4), 2: np.ones(4)}, {2: "upload"})


def test_protocol_rejects_mismatched_pair(ctx: ts.Context) -> None:
    other = make_ckks_context()
    with pytest.raises(CKKSContextError, match="does not belong"):
        CKKSAggregation(secret_context_bytes(ctx), public_context_bytes(other), 2)


# ----------------------------------------------------------------------------- key files


def test_init_keys_files(tmp_path: Path) -> None:
    secret, public = init_ckks_keys(tmp_path / "keys")
    assert (secret.name, public.name) == (SECRET_CONTEXT_FILE, PUBLIC_CONTEXT_FILE)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert sorted(p.name for p in secret.parent.iterdir()) == sorted(
        [SECRET_CONTEXT_FILE, PUBLIC_CONTEXT_FILE]
    )  # no temp files left behind
    sctx, pctx = load_ckks_context(secret), load_ckks_context(public)
    assert sctx.is_private() and not pctx.is_private()
    assert context_fingerprint(sctx) == context_fingerprint(pctx)
    with pytest.raises(FileExistsError, match="overwrite"):
        init_ckks_keys(tmp_path / "keys")

    cfg = SecureAggregationConfig(protocol="ckks", keys_dir=tmp_path / "keys")
    proto = CKKSAggregation.from_config(cfg, 2)
    assert not proto.server.context.is_private()
    assert proto.server.fingerprint == context_fingerprint(sctx)
    res = proto.aggregate(0, {0: np.full(5, 0.5), 1: np.full(5, 0.25)})
    np.testing.assert_allclose(res.total, 0.75, atol=proto.error_bound(2, 0.5))

    # a config asking for other parameters than the files hold
    cfg2 = SecureAggregationConfig(protocol="ckks", keys_dir=tmp_path / "keys", ckks_scale_bits=30)
    with pytest.raises(CKKSContextError, match="ckks_"):
        CKKSAggregation.from_config(cfg2, 2)


def test_keys_dir_missing_files(tmp_path: Path) -> None:
    cfg = SecureAggregationConfig(protocol="ckks", keys_dir=tmp_path / "nowhere")
    with pytest.raises(CKKSKeyFileError) as info:
        CKKSAggregation.from_config(cfg, 2)
    msg = str(info.value)
    assert "secure_aggregation.keys_dir" in msg
    assert "securefed keys init --ckks --out" in msg
    with pytest.raises(CKKSKeyFileError):
        load_ckks_context(tmp_path / "missing.ctx")


def test_keys_dir_mismatched_or_leaky_files(tmp_path: Path) -> None:
    init_ckks_keys(tmp_path / "a")
    init_ckks_keys(tmp_path / "b")
    (tmp_path / "a" / PUBLIC_CONTEXT_FILE).write_bytes(
        (tmp_path / "b" / PUBLIC_CONTEXT_FILE).read_bytes()
    )
    with pytest.raises(CKKSContextError, match="does not belong"):
        CKKSAggregation.from_keys_dir(tmp_path / "a", 2)
    # a public file that carries the secret key is refused
    (tmp_path / "b" / PUBLIC_CONTEXT_FILE).write_bytes(
        (tmp_path / "b" / SECRET_CONTEXT_FILE).read_bytes()
    )
    with pytest.raises(CKKSKeyPermissionError, match="accessible by group/others"):
        CKKSAggregation.from_keys_dir(tmp_path / "b", 2)
    (tmp_path / "b" / PUBLIC_CONTEXT_FILE).chmod(0o600)
    with pytest.raises(CKKSContextError, match="SECRET key"):
        CKKSAggregation.from_keys_dir(tmp_path / "b", 2)
    (tmp_path / "c.ctx").write_bytes(b"garbage")
    with pytest.raises(CKKSContextError, match="not a valid TenSEAL context"):
        load_ckks_context(tmp_path / "c.ctx")


def test_world_readable_secret_is_refused(tmp_path: Path) -> None:
    secret, _ = init_ckks_keys(tmp_path / "k")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    secret.chmod(0o644)
    with pytest.raises(CKKSKeyPermissionError, match="chmod 600"):
        load_ckks_context(secret)
    # never beside the server's identity key
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "server.key").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="never"):
        init_ckks_keys(tmp_path / "s")
    assert not (tmp_path / "s" / SECRET_CONTEXT_FILE).exists()


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (CKKSParams(3000, (60, 40, 40), 40), "power of two"),
        (CKKSParams(8192, (60,), 40), "at least 2 primes"),
        (CKKSParams(8192, (61, 40, 40), 40), "20..60 bits"),
        (CKKSParams(4096, (60, 40, 40), 40), "128-bit-security"),
        (CKKSParams(8192, (40, 40), 30), "headroom"),
        (CKKSParams(8192, (60, 40, 40), 9), "10..60"),
    ],
)
def test_invalid_params(params: CKKSParams, match: str) -> None:
    with pytest.raises(CKKSContextError, match=match):
        validate_ckks_params(params)


def test_invalid_params_from_config() -> None:
    cfg = SecureAggregationConfig(
        protocol="ckks", ckks_coeff_mod_bit_sizes=(60, 40), ckks_scale_bits=50
    )
    with pytest.raises(CKKSContextError, match=r"secure_aggregation.ckks_scale_bits"):
        build_protocol(cfg, 2)


def test_other_parameters_work() -> None:
    params = CKKSParams(4096, (40, 20, 40), 20)
    proto = CKKSAggregation.ephemeral(2, params)
    rng = np.random.default_rng(0)
    inputs = {c: rng.uniform(-1, 1, 2100) for c in range(2)}
    res = proto.aggregate(0, inputs)
    assert res.info["chunks"] == 2  # 2048 slots per ciphertext
    err = np.max(np.abs(res.total - inputs[0] - inputs[1]))
    assert err <= proto.error_bound(2, 1.0)
    assert err > 1e-6  # 2^20 scale: visibly noisier than 2^40


def test_a_deployment_binds_its_run_id_into_every_signature(ctx: ts.Context) -> None:
    """Attack: replay a previous run's round-1 upload (validly signed by the site) in a new
    run's round 1. With the run id bound into the signed payload (a deployment's ``session``),
    the server of the new run refuses it; the same run accepts it, and the key holder refuses
    an aggregate signed for another run."""
    key = Ed25519PrivateKey.generate()
    server_key = Ed25519PrivateKey.generate()
    old, new = os.urandom(16), os.urandom(16)
    x = np.linspace(-0.5, 0.5, 10)
    upload = CKKSClient(0, ctx, key, session=old).encrypt_update(1, x)

    def server(session: bytes) -> CKKSServer:
        s = CKKSServer(public_context_bytes(ctx), {0: key.public_key()}, server_key,
                       session=session)
        s.begin_round(1, x.shape[0])
        return s

    with pytest.raises(CKKSMessageError, match="client 0: signature"):
        server(new).receive(0, upload)
    same = server(old)
    same.receive(0, upload)
    aggregate = same.finish()
    got = CKKSClient(0, ctx, key, session=old).decrypt_aggregate(
        1, x.shape[0], aggregate, server_key.public_key()
    )
    assert np.max(np.abs(got - x)) < 1e-4
    with pytest.raises(CKKSMessageError, match="server: signature"):
        CKKSClient(0, ctx, key, session=new).decrypt_aggregate(
            1, x.shape[0], aggregate, server_key.public_key()
        )
    # without a session (the in-process protocol) the payload is the old one
    plain = CKKSClient(0, ctx, key).encrypt_update(1, x)
    with pytest.raises(CKKSMessageError, match="signature"):
        server(old).receive(0, plain)
