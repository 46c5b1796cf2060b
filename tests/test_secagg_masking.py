"""SecAgg / SecAgg+ masking: correctness against the plain sum, dropouts, fail-closed aborts,
dishonest-server refusals, the server's view, tampering, message checks, Shamir, quantisation."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securefed.config import SecureAggregationConfig
from securefed.secagg import build_protocol
from securefed.secagg.base import AggregationAbortedError
from securefed.secagg.keys import Identities, ephemeral_identities
from securefed.secagg.masking import (
    MaskingAggregation,
    MaskingClient,
    MaskingParams,
    MaskingServer,
    ProtocolError,
    Stage,
    build_graph,
    decode_message,
    plan_round,
    quantization_error_bound,
    quantization_params,
    resolve_threshold,
    shamir,
)
from securefed.secagg.masking.messages import (
    AdvertiseKeys,
    MaskedInput,
    ShareBroadcast,
    UnmaskRequest,
    UnmaskShares,
)
from securefed.secagg.masking.quantize import (
    decode_words,
    dequantize_sum,
    encode_words,
    quantize,
)
from tests.helpers import uniform_inputs

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = 5


def _proto(
    n: int,
    threshold: float = 0.5,
    k: int | None = None,
    bits: int = 32,
    clip: float = 1.0,
    **kw: object,
) -> MaskingAggregation:
    params = MaskingParams(threshold, k, bits, clip)
    return MaskingAggregation(params, ephemeral_identities(n), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ reference model of aborts


def _expected(params: MaskingParams, n: int, dropouts: dict[int, str]) -> tuple[int, ...] | None:
    """Slow set-based model of the fail-closed rules: the survivor set, or None (abort)."""
    plan = plan_round(params, ROUND, list(range(n)), 4)
    g, t = plan.graph, plan.threshold
    rank = {c: Stage.index(s) for c, s in dropouts.items()}

    def alive_after(stage: str, live: set[int]) -> set[int]:
        return {c for c in live if rank.get(c, 99) > Stage.index(stage)}

    def prune(live: set[int]) -> set[int]:
        while True:
            bad = {u for u in live if len((g.neighbours(u) | {u}) & live) < t}
            if not bad:
                return live
            live = live - bad

    u1 = prune(alive_after(Stage.ADVERTISE_KEYS, set(range(n))))
    if len(u1) < t:
        return None
    u2 = prune(alive_after(Stage.SHARE_KEYS, u1))
    if len(u2) < t:
        return None
    u3 = alive_after(Stage.MASKED_INPUT, u2)
    if len(u3) < t or not g.is_connected(u3):
        return None
    needed = [v for v in u2 - u3 if g.neighbours(v) & u3]

    def enough(resp: set[int]) -> bool:
        return all(len((g.neighbours(u) | {u}) & resp) >= t for u in u3) and all(
            len(g.neighbours(v) & resp) >= t for v in needed
        )

    u4 = alive_after(Stage.CONSISTENCY_CHECK, u3)
    u5 = alive_after(Stage.UNMASKING, u4)
    if not enough(u3) or len(u4) < t or not enough(u4) or len(u5) < t or not enough(u5):
        return None
    return tuple(sorted(u3))


@st.composite
def rounds(draw: st.DrawFn) -> tuple[MaskingParams, int, int, dict[int, str]]:
    n = draw(st.integers(2, 8))
    d = draw(st.integers(1, 24))
    k = draw(st.sampled_from([None, 2, 3, 4]))
    fractions = st.sampled_from([0.3, 0.5, 0.67, 1.0])
    threshold = draw(st.one_of(fractions, st.sampled_from(range(2, n + 1)).map(float)))
    ndrop = draw(st.sampled_from(range(n)))
    who = draw(st.permutations(range(n)))[:ndrop]
    drops = {c: draw(st.sampled_from(Stage.ORDER)) for c in who}
    # the semi-honest protocol (no consistency stage) has the same survivors: a drop at the
    # consistency check becomes a drop before unmasking, and the reference model is monotone
    params = MaskingParams(threshold, k, draw(st.sampled_from([24, 32, 40])), 1.0,
                           consistency_check=draw(st.booleans()))
    return params, n, d, drops


@st.composite
def recoverable_rounds(draw: st.DrawFn) -> tuple[MaskingParams, int, int, dict[int, str]]:
    """Rounds that mostly succeed: 4-8 clients, a low threshold, at most a third dropping."""
    n = draw(st.integers(4, 8))
    who = draw(st.permutations(range(n)))[: draw(st.integers(1, n // 3))]
    drops = {c: draw(st.sampled_from(Stage.ORDER)) for c in who}
    k = draw(st.sampled_from([None, 4]))
    return MaskingParams(2.0, k, 32, 1.0), n, draw(st.integers(1, 16)), drops


@FAST
@given(case=rounds(), seed=st.integers(0, 2**16))
def test_masked_sum_equals_plain_sum_of_survivors(
    case: tuple[MaskingParams, int, int, dict[int, str]], seed: int
) -> None:
    _check_round(*case, seed)


@FAST
@given(case=recoverable_rounds(), seed=st.integers(0, 2**16))
def test_dropouts_at_every_stage_are_recovered(
    case: tuple[MaskingParams, int, int, dict[int, str]], seed: int
) -> None:
    _check_round(*case, seed)


def _check_round(params: MaskingParams, n: int, d: int, drops: dict[int, str], seed: int) -> None:
    graph_size = build_graph(ROUND, range(n), params.neighbours).neighbourhood_size
    if params.threshold > graph_size:  # a count above the neighbourhood: rejected up front
        with pytest.raises(ValueError, match=r"secure_aggregation\.threshold"):
            resolve_threshold(params.threshold, graph_size)
        return
    xs = uniform_inputs(n, d, seed, scale=1.3)  # some values beyond clip_range = 1
    proto = MaskingAggregation(params, ephemeral_identities(n))
    expected = _expected(params, n, drops)
    if expected is None:
        with pytest.raises(AggregationAbortedError):
            proto.aggregate(ROUND, xs, drops)
        view = proto.last_server_view
        assert view is not None
        # aborted before unmasking (no share revealed) unless it fell short AT unmasking
        unmask_msgs = [m for m in view.messages if m.stage == Stage.UNMASKING]
        if unmask_msgs:
            assert proto.last_server is not None and proto.last_server.output is None
        return
    res = proto.aggregate(ROUND, xs, drops)
    assert res.survivors == expected
    want = sum(np.clip(xs[c], -1.0, 1.0) for c in expected)
    bound = quantization_error_bound(quantization_params(params.bits, 1.0, n), len(expected))
    assert np.max(np.abs(res.total - want)) <= bound
    assert set(res.dropped) == set(range(n)) - set(expected) | set(drops)
    assert res.total.dtype == np.float64 and res.total.shape == (d,)
    t = res.info["threshold"]
    assert isinstance(t, int) and t >= 2
    assert proto.last_server_view is not None
    assert sum(res.bytes_up.values()) == proto.last_server_view.total_bytes()


def test_every_dropout_stage_recovers() -> None:
    proto = _proto(8, threshold=0.5)
    xs = uniform_inputs(8, 50, 1)
    drops = {
        1: Stage.ADVERTISE_KEYS,
        2: Stage.SHARE_KEYS,
        3: Stage.MASKED_INPUT,
        4: Stage.CONSISTENCY_CHECK,
    }
    del xs[1]  # drops before anything: need not have trained
    res = proto.aggregate(ROUND, xs, drops)
    assert res.survivors == (0, 4, 5, 6, 7)
    assert res.info["dropouts_recovered"] == 1 and res.info["recovered_clients"] == [3]
    assert res.info["late_dropouts"] == [4]
    want = sum(xs[c] for c in res.survivors)
    assert np.max(np.abs(res.total - want)) <= res.info["quantization_error_bound"]
    assert res.bytes_up[1] == 0 and res.bytes_down[1] == 0


def test_k_regular_recovers_dropouts_and_costs_less() -> None:
    n = 16
    xs = uniform_inputs(n, 64, 2)
    full = _proto(n, threshold=0.5).aggregate(ROUND, xs, {3: Stage.MASKED_INPUT})
    sparse = _proto(n, threshold=0.5, k=4).aggregate(ROUND, xs, {3: Stage.MASKED_INPUT})
    for res in (full, sparse):
        want = sum(xs[c] for c in res.survivors)
        assert np.max(np.abs(res.total - want)) <= res.info["quantization_error_bound"]
    assert sparse.info["neighbours"] == 4 and sparse.info["threshold"] == 3
    assert full.info["neighbours"] == "all" and full.info["threshold"] == 8
    assert sum(sparse.bytes_up.values()) < sum(full.bytes_up.values())


def test_fewer_than_t_survivors_fails_closed() -> None:
    proto = _proto(5, threshold=3.0)
    xs = uniform_inputs(5, 10)
    drops = {0: Stage.MASKED_INPUT, 1: Stage.MASKED_INPUT, 2: Stage.MASKED_INPUT}
    with pytest.raises(AggregationAbortedError, match="threshold is 3"):
        proto.aggregate(ROUND, xs, drops)
    view = proto.last_server_view
    assert view is not None
    assert not [m for m in view.messages if m.stage in (Stage.CONSISTENCY_CHECK, Stage.UNMASKING)]


def test_survivors_shrinking_below_t_at_unmasking_aborts() -> None:
    proto = _proto(4, threshold=3.0)
    drops = {0: Stage.UNMASKING, 1: Stage.UNMASKING}
    with pytest.raises(AggregationAbortedError, match="shrank below t=3"):
        proto.aggregate(ROUND, uniform_inputs(4, 10), drops)
    assert proto.last_server is not None and proto.last_server.output is None


def test_disconnected_survivor_graph_aborts() -> None:
    # k = 2 is a ring: with two non-adjacent dropouts the survivors split in two arcs
    n = 8
    params = MaskingParams(2.0, 2, 32, 1.0)
    ring = [int(c) for c in plan_round(params, ROUND, range(n), 4).graph.ring]
    drops = {ring[0]: Stage.MASKED_INPUT, ring[4]: Stage.MASKED_INPUT}
    proto = MaskingAggregation(params, ephemeral_identities(n))
    with pytest.raises(AggregationAbortedError, match="disconnected"):
        proto.aggregate(ROUND, uniform_inputs(n, 6), drops)


def test_config_registry_and_threshold_resolution() -> None:
    cfg = SecureAggregationConfig(protocol="masking", threshold=0.5)
    proto = build_protocol(cfg, 10)
    assert isinstance(proto, MaskingAggregation)
    assert proto.dropout_stages[0] == Stage.ADVERTISE_KEYS
    assert resolve_threshold(0.5, 10) == 5
    assert resolve_threshold(0.01, 10) == 2
    assert resolve_threshold(1.0, 10) == 10
    assert resolve_threshold(0.3, 10) == 3  # no float round-up to 4
    assert resolve_threshold(4.0, 10) == 4
    with pytest.raises(ValueError, match=r"secure_aggregation\.threshold"):
        MaskingAggregation.from_config(cfg.model_copy(update={"threshold": 11.0}), 10)
    with pytest.raises(ValueError, match=r"secure_aggregation\.threshold"):  # t > k + 1
        MaskingAggregation.from_config(
            cfg.model_copy(update={"threshold": 6.0, "neighbours": 4}), 100
        )
    with pytest.raises(ValueError, match=r"secure_aggregation\.bits"):
        MaskingAggregation.from_config(cfg.model_copy(update={"bits": 12}), 1000)
    # a count threshold above a (sampled) round's size aborts that round, fail closed
    with pytest.raises(AggregationAbortedError, match=r"t=4 exceeds"):
        MaskingAggregation.from_config(cfg.model_copy(update={"threshold": 4.0}), 10).aggregate(
            1, uniform_inputs(3, 5)
        )
    k_proto = MaskingAggregation.from_config(cfg.model_copy(update={"neighbours": 4}), 20)
    res = k_proto.aggregate(1, uniform_inputs(20, 5))
    assert res.info["threshold"] == 3 and res.info["neighbours"] == 4


# ---------------------------------------------------------------------- role-level harness


def _roles(
    n: int, d: int, params: MaskingParams | None = None, seed: int = 0
) -> tuple[MaskingServer, dict[int, MaskingClient], Identities, dict[int, np.ndarray]]:
    params = params or MaskingParams(0.5, None, 32, 1.0)
    ids = ephemeral_identities(n)
    xs = uniform_inputs(n, d, seed)
    server = MaskingServer(ROUND, range(n), d, params, ids.roster, ids.server_key)
    clients = {
        c: MaskingClient(c, ROUND, params, ids.client_keys[c], ids.roster, xs[c]) for c in range(n)
    }
    return server, clients, ids, xs


def _step(
    server: MaskingServer, clients: dict[int, MaskingClient], down: dict[int, bytes]
) -> dict[int, bytes]:
    for cid, data in down.items():
        server.receive(cid, clients[cid].handle(data))
    return server.close_stage()


def _run_to(
    stage: str, server: MaskingServer, clients: dict[int, MaskingClient]
) -> dict[int, bytes]:
    """Deliver stages before ``stage``; return the server messages that open ``stage``."""
    down = server.start()
    for s in Stage.ORDER[: Stage.index(stage)]:
        assert server.stage == s
        down = _step(server, clients, down)
    return down


def test_dishonest_server_asking_both_share_kinds_is_refused() -> None:
    server, clients, ids, _ = _roles(4, 8)
    down = _run_to(Stage.UNMASKING, server, clients)
    req = decode_message(down[0], 0)
    assert isinstance(req, UnmaskRequest)
    # claim survivor 2 dropped too: asks client 0 for both b_2 and s_2
    evil = dataclasses.replace(req, dropped=tuple(sorted({*req.dropped, 2})))
    with pytest.raises(ProtocolError, match=r"client 0: share request.*both.*client 2"):
        clients[0].handle(evil.signed_bytes(ids.server_key))
    # an honest request is answered once; asking again (for the other kind) is refused
    clients[1].handle(down[1])
    req1 = decode_message(down[1], 1)
    assert isinstance(req1, UnmaskRequest)
    again = dataclasses.replace(req1, survivors=(0, 1, 3), dropped=(2,))
    with pytest.raises(ProtocolError, match="client 1: stage"):
        clients[1].handle(again.signed_bytes(ids.server_key))
    # a survivor set other than the one signed at the consistency check is refused
    other = dataclasses.replace(req, survivors=(0, 1, 3), dropped=(2,))
    with pytest.raises(ProtocolError, match="client 0: consistency"):
        clients[0].handle(other.signed_bytes(ids.server_key))


def test_client_refuses_unmasking_without_t_consistency_signatures() -> None:
    server, clients, ids, _ = _roles(4, 8, MaskingParams(3.0, None, 32, 1.0))
    down = _run_to(Stage.UNMASKING, server, clients)
    req = decode_message(down[0], 0)
    assert isinstance(req, UnmaskRequest)
    evil = dataclasses.replace(req, signatures=req.signatures[:2])
    with pytest.raises(ProtocolError, match="client 0: threshold"):
        clients[0].handle(evil.signed_bytes(ids.server_key))


def test_tampered_share_ciphertext_fails_aead_and_names_sender() -> None:
    server, clients, ids, _ = _roles(3, 8)
    down = _run_to(Stage.MASKED_INPUT, server, clients)
    msg = decode_message(down[0], 0)
    assert isinstance(msg, ShareBroadcast)
    sender, ct = msg.ciphertexts[0]
    bad = bytearray(ct)
    bad[5] ^= 1
    evil = dataclasses.replace(msg, ciphertexts=((sender, bytes(bad)), *msg.ciphertexts[1:]))
    with pytest.raises(ProtocolError, match=rf"client {sender}: share authentication"):
        clients[0].handle(evil.signed_bytes(ids.server_key))


# ------------------------------------------------------------------------- server's view


def _as_unit(words: np.ndarray, bits: int) -> np.ndarray:
    return words.astype(np.float64) / float(1 << bits)


def _masked_of(proto: MaskingAggregation, cid: int, d: int, bits: int = 32) -> np.ndarray:
    assert proto.last_server_view is not None
    (raw,) = proto.last_server_view.from_client(cid, Stage.MASKED_INPUT)
    msg = decode_message(raw, cid)
    assert isinstance(msg, MaskedInput)
    return decode_words(msg.masked, d, bits)


def _arrays(obj: object, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes and containers."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in _arrays(v, seen)]
    if isinstance(obj, list | tuple | set | frozenset):
        return [a for v in obj for a in _arrays(v, seen)]
    if hasattr(obj, "__dict__"):
        return [a for v in vars(obj).values() for a in _arrays(v, seen)]
    if dataclasses.is_dataclass(obj):
        return [a for f in dataclasses.fields(obj) for a in _arrays(getattr(obj, f.name), seen)]
    return []


def test_server_view_reveals_no_individual_update() -> None:
    n, d = 4, 4000
    rng = np.random.default_rng(7)
    xs = {i: rng.uniform(-1, 1, d) for i in range(n)}
    proto = _proto(n)
    res = proto.aggregate(ROUND, xs)
    view = proto.last_server_view
    assert view is not None
    assert view.total_bytes() == sum(res.bytes_up.values())
    assert {m.stage for m in view.messages} == set(Stage.ORDER)
    for cid in range(n):
        y = _as_unit(_masked_of(proto, cid, d), 32)
        # masked vector independent of the input, and uniform on [0, 1)
        assert abs(np.corrcoef(y, xs[cid])[0, 1]) < 0.1
        counts = np.histogram(y, bins=16, range=(0, 1))[0]
        chi2 = float(((counts - d / 16) ** 2 / (d / 16)).sum())
        assert chi2 < 60  # 15 dof: p < 1e-6
        # no raw float encoding of the input in anything the server received
        for m in view.messages:
            assert xs[cid][:2].tobytes() not in m.data
            assert xs[cid][:4].astype(np.float32).tobytes() not in m.data
    # the server object never held an individual (plain or quantised) update
    server = proto.last_server
    held = [a for a in _arrays(server) if a.shape == (d,)]
    assert held  # the running masked sum and the output
    for a in held:
        for cid in range(n):
            assert abs(np.corrcoef(a.astype(np.float64), xs[cid])[0, 1]) < 0.9


def test_masked_inputs_indistinguishable_for_different_inputs() -> None:
    from scipy.stats import ks_2samp

    d = 3000
    lo = {0: np.full(d, -1.0), 1: np.zeros(d), 2: np.zeros(d)}
    hi = {0: np.full(d, 1.0), 1: np.zeros(d), 2: np.zeros(d)}
    samples = []
    for xs in (lo, hi):
        proto = _proto(3)
        proto.aggregate(ROUND, xs)
        samples.append(_as_unit(_masked_of(proto, 0, d), 32))
    assert ks_2samp(samples[0], samples[1]).pvalue > 1e-4
    for s in samples:
        assert ks_2samp(s, np.linspace(0, 1, d, endpoint=False)).pvalue > 1e-4


# ---------------------------------------------------------------------------- tampering


def _flip_round(target: int, bit: int) -> tuple[ProtocolError | None, tuple[str, int] | None]:
    counter = {"i": 0}
    hit: dict[str, tuple[str, int]] = {}

    def intercept(direction: str, stage: str, cid: int, data: bytes) -> bytes:
        i = counter["i"]
        counter["i"] += 1
        if i != target:
            return data
        hit["m"] = (direction, cid)
        flipped = bytearray(data)
        pos = bit % (8 * len(flipped))
        flipped[pos // 8] ^= 1 << (pos % 8)
        return bytes(flipped)

    proto = _proto(3, threshold=2.0, intercept=intercept)
    try:
        proto.aggregate(ROUND, uniform_inputs(3, 6))
    except ProtocolError as exc:
        return exc, hit.get("m")
    return None, hit.get("m")


@settings(max_examples=6, deadline=None)
@given(bits=st.lists(st.integers(0, 2**20), min_size=30, max_size=30))
def test_any_flipped_bit_is_detected_and_names_the_client(bits: list[int]) -> None:
    # 3 clients x 5 stages x (down + up) = 30 messages; flip one bit in each, one round each
    for target, bit in enumerate(bits):
        err, hit = _flip_round(target, bit)
        assert hit is not None
        assert err is not None, f"flip of bit {bit} in message {target} ({hit}) went unnoticed"
        assert err.client == hit[1]
        assert f"client {hit[1]}:" in str(err)


# ----------------------------------------------------------------------- message checks


def test_bad_signature_is_rejected() -> None:
    server, clients, ids, xs = _roles(3, 4)
    impostor = MaskingClient(
        2, ROUND, clients[2].params, ephemeral_identities(3).client_keys[2], ids.roster, xs[2]
    )
    down = server.start()
    with pytest.raises(ProtocolError, match=r"client 2: signature check failed"):
        server.receive(2, impostor.handle(down[2]))


def test_wrong_round_is_rejected() -> None:
    server, clients, ids, xs = _roles(3, 4)
    down = server.start()
    # a client of round 6 gets round 5's message
    late = MaskingClient(1, ROUND + 1, clients[1].params, ids.client_keys[1], ids.roster, xs[1])
    with pytest.raises(ProtocolError, match=r"client 1: round id check failed"):
        late.handle(down[1])
    # a correctly signed upload for the wrong round
    adv = decode_message(clients[1].handle(down[1]), 1)
    assert isinstance(adv, AdvertiseKeys)
    replay = dataclasses.replace(adv, round_id=ROUND + 1).signed_bytes(ids.client_keys[1])
    with pytest.raises(ProtocolError, match=r"client 1: round id check failed"):
        server.receive(1, replay)


def test_unknown_sender_is_rejected() -> None:
    server, clients, _, _ = _roles(3, 4)
    down = server.start()
    reply = clients[0].handle(down[0])
    with pytest.raises(ProtocolError, match=r"client 99: sender check failed.*roster"):
        server.receive(99, reply)
    with pytest.raises(ProtocolError, match=r"client 1: sender check failed"):
        server.receive(1, reply)  # client 0's message arriving on client 1's channel
    with pytest.raises(ProtocolError, match=r"client 7: sender check failed"):
        _proto(3).aggregate(ROUND, {**uniform_inputs(3, 4), 7: np.zeros(4)})


def test_wrong_length_is_rejected() -> None:
    params = MaskingParams(0.5, None, 32, 1.0)
    with pytest.raises(ValueError, match="client 2"):
        _proto(3).aggregate(ROUND, {0: np.zeros(4), 1: np.zeros(4), 2: np.zeros(5)})
    server, clients, ids, _ = _roles(3, 4, params)
    down = server.start()
    short = MaskingClient(2, ROUND, params, ids.client_keys[2], ids.roster, np.zeros(3))
    with pytest.raises(ProtocolError, match=r"client 2: length check failed"):
        short.handle(down[2])
    # a signed masked input of the wrong length, at the server
    down = _run_to(Stage.MASKED_INPUT, server, clients)
    good = decode_message(clients[2].handle(down[2]), 2)
    assert isinstance(good, MaskedInput)
    bad = dataclasses.replace(good, masked=good.masked[:-4]).signed_bytes(ids.client_keys[2])
    with pytest.raises(ProtocolError, match=r"client 2: length check failed"):
        server.receive(2, bad)


def test_out_of_range_masked_value_is_rejected() -> None:
    params = MaskingParams(0.5, None, 20, 1.0)  # 3 bytes per element: values >= 2^20 exist
    server, clients, ids, _ = _roles(3, 4, params)
    down = _run_to(Stage.MASKED_INPUT, server, clients)
    good = decode_message(clients[1].handle(down[1]), 1)
    assert isinstance(good, MaskedInput)
    bad = dataclasses.replace(good, masked=b"\xff" * len(good.masked))
    with pytest.raises(ProtocolError, match=r"client 1: range check failed"):
        server.receive(1, bad.signed_bytes(ids.client_keys[1]))


def test_nan_input_is_rejected() -> None:
    xs = uniform_inputs(3, 4)
    xs[1][2] = np.nan
    with pytest.raises(ValueError, match=r"client 1.*NaN"):
        _proto(3).aggregate(ROUND, xs)
    ids = ephemeral_identities(3)
    params = MaskingParams(0.5, None, 32, 1.0)
    with pytest.raises(ProtocolError, match=r"client 1: finite check failed"):
        MaskingClient(1, ROUND, params, ids.client_keys[1], ids.roster, xs[1])


def test_out_of_order_and_replayed_messages_are_rejected() -> None:
    server, clients, _, _ = _roles(3, 4)
    down = server.start()
    reply = clients[0].handle(down[0])
    with pytest.raises(ProtocolError, match="client 0: stage"):
        clients[0].handle(down[0])  # RoundStart twice
    server.receive(0, reply)
    with pytest.raises(ProtocolError, match="client 0: duplicate"):
        server.receive(0, reply)
    with pytest.raises(ProtocolError, match="client 1: recipient"):
        clients[1].handle(down[0])


@FAST
@given(data=st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(data: bytes) -> None:
    try:
        decode_message(data, 4)
    except ProtocolError as exc:
        assert exc.client == 4


# ------------------------------------------------------------------------------- Shamir


@FAST
@given(t=st.integers(1, 6), extra=st.integers(0, 4), seed=st.integers(0, 2**32))
def test_shamir_any_t_shares_reconstruct(t: int, extra: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    secret = int.from_bytes(rng.bytes(32), "big")
    xs = [int(x) + 1 for x in rng.choice(1000, size=t + extra, replace=False)]
    shares = shamir.split(secret, t, xs)
    for _ in range(3):
        subset = rng.choice(xs, size=t, replace=False)
        assert shamir.reconstruct({int(x): shares[int(x)] for x in subset}, t) == secret
    if t > 1:
        fewer = {int(x): shares[int(x)] for x in rng.choice(xs, size=t - 1, replace=False)}
        with pytest.raises(ValueError, match="need"):
            shamir.reconstruct(fewer, t)
        # interpolating t-1 shares as if they were enough gives an unrelated value
        assert shamir.reconstruct(fewer, t - 1) != secret


def test_shamir_t_minus_one_shares_are_uniform() -> None:
    # with t = 2 one share is s + a * x with a uniform: its distribution ignores s
    tops = {}
    for secret in (0, (1 << 256) - 1):
        vals = np.array([shamir.split(secret, 2, [1, 2])[1] / shamir.PRIME for _ in range(400)])
        tops[secret] = vals
        assert 0.4 < vals.mean() < 0.6
    from scipy.stats import ks_2samp

    assert ks_2samp(tops[0], tops[(1 << 256) - 1]).pvalue > 1e-4


def test_shamir_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        shamir.split(5, 3, [1, 2])
    with pytest.raises(ValueError):
        shamir.split(5, 2, [1, 1])
    with pytest.raises(ValueError):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)


@FAST
@given(
    t=st.integers(1, 7),
    extra=st.integers(0, 7),
    wrong=st.integers(0, 7),
    seed=st.integers(0, 2**32),
    subsets=st.sampled_from([0, 20_000]),
)
def test_shamir_verified_reconstruction_survives_wrong_shares(
    t: int, extra: int, wrong: int, seed: int, subsets: int
) -> None:
    """Wrong shares (a malicious holder) are outvoted: decoding with errors corrects up to
    (m - t) / 2 of m; t-subsets checked against the commitment need only t correct ones. The
    wrong shares' points are returned (the holders to blame); beyond that the call fails."""
    rng = np.random.default_rng(seed)
    secret = int.from_bytes(rng.bytes(32), "big")
    m = t + extra
    xs = [int(x) + 1 for x in rng.choice(1000, size=m, replace=False)]
    shares = shamir.split(secret, t, xs)
    bad = {int(x) for x in rng.choice(xs, size=min(wrong, m), replace=False)}
    for x in bad:
        shares[x] = (shares[x] + 1 + int(rng.integers(1 << 62))) % shamir.PRIME
    correctable = len(bad) <= (m - t) // 2 if subsets == 0 else m - len(bad) >= t
    try:
        value, blamed = shamir.reconstruct_verified(
            shares, t, lambda v: v == secret, max_subsets=subsets
        )
    except ValueError as exc:  # never a wrong secret: an error, and only when not correctable
        assert not correctable
        assert "too many wrong shares" in str(exc)
        return
    assert value == secret
    assert set(blamed) <= bad
    if shamir.reconstruct(shares, t) != secret:  # the lowest t points were not enough
        assert set(blamed) == bad


def _lying_unmask(data: bytes, liar: int, key: object, params: MaskingParams, kind: str) -> bytes:
    """``liar``'s UnmaskShares with its first share of ``kind`` ("b" or "s") off by one,
    correctly signed by the liar (it is the liar's own message)."""
    msg = decode_message(data, liar, params.session)
    assert isinstance(msg, UnmaskShares)
    shares = msg.b_shares if kind == "b" else msg.s_shares
    (owner, share), *rest = shares
    wrong = ((owner, shamir.encode_share((shamir.decode_share(share) + 1) % shamir.PRIME)),
             *rest)
    evil = (dataclasses.replace(msg, b_shares=wrong) if kind == "b"
            else dataclasses.replace(msg, s_shares=wrong))
    return evil.signed_bytes(key)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "n", "threshold", "drop"), [("b", 4, 0.67, None),
                                                               ("s", 5, 3.0, 4)])
def test_one_wrong_share_is_corrected_and_blamed_on_its_holder(
    kind: str, n: int, threshold: float, drop: int | None
) -> None:
    """One malicious holder returns a wrong share of another client's self-mask seed (b) or of
    a dropped client's mask key (s). The round completes with the exact sum from the other
    shares, and the holder, not the secret's owner, is named."""
    params = MaskingParams(threshold, None, 32, 1.0, session=b"run-1")
    server, clients, ids, xs = _roles(n, 6, params)
    down = server.start()
    for stage in Stage.ORDER:
        for cid, data in down.items():
            if drop is not None and cid == drop and Stage.index(stage) >= 2:
                continue
            reply = clients[cid].handle(data)
            if stage == Stage.UNMASKING and cid == 1:
                reply = _lying_unmask(reply, 1, ids.client_keys[1], params, kind)
            server.receive(cid, reply)
        down = server.close_stage()
    out = server.output
    assert out is not None
    survivors = [c for c in range(n) if c != drop]
    assert out.survivors == tuple(survivors)
    np.testing.assert_allclose(out.total, sum(xs[c] for c in survivors), atol=1e-6)
    assert out.bad_share_holders == (1,)


def test_uncorrectable_wrong_share_aborts_the_round_in_process() -> None:
    """With t = m (no spare share) a wrong share cannot be corrected: the in-process driver
    raises AggregationAbortedError (the simulation abandons the round), naming the secret and
    the holders, never crashing the run with a ProtocolError blaming the owner."""
    proto = _proto(3, threshold=1.0)
    liar_key = proto.identities.client_keys[2]

    def intercept(direction: str, stage: str, cid: int, data: bytes) -> bytes:
        if direction == "up" and stage == Stage.UNMASKING and cid == 2:
            return _lying_unmask(data, 2, liar_key, proto.params, "b")
        return data

    proto.intercept = intercept
    with pytest.raises(AggregationAbortedError, match=r"client 0's self-mask seed cannot be "
                                                      r"reconstructed .* clients \[0, 1, 2\]"):
        proto.aggregate(ROUND, uniform_inputs(3, 5))


def test_protocol_errors_in_process_abort_the_round() -> None:
    """A message that fails a check ends the in-process round with an error that is both the
    ProtocolError (naming the client and the check) and an AggregationAbortedError."""
    proto = _proto(3, threshold=1.0)

    def intercept(direction: str, stage: str, cid: int, data: bytes) -> bytes:
        if direction == "up" and stage == Stage.MASKED_INPUT and cid == 1:
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    proto.intercept = intercept
    with pytest.raises(AggregationAbortedError) as info:
        proto.aggregate(ROUND, uniform_inputs(3, 5))
    assert isinstance(info.value, ProtocolError)
    assert (info.value.client, info.value.check) == (1, "signature")


def test_messages_keys_and_ciphertexts_of_another_run_fail() -> None:
    """A previous run's round-1 AdvertiseKeys (correctly signed by its client) fails the
    signature check in a new run's round 1; so does the previous run's RoundStart; share
    ciphertexts, derived keys and commitments differ between runs."""
    from cryptography.exceptions import InvalidTag

    from securefed.noise.prg import derive_key
    from securefed.secagg.masking.client import b_commitment, decrypt_shares, encrypt_shares

    ids = ephemeral_identities(3)
    old = MaskingParams(1.0, None, 32, 1.0, session=b"\x01" * 16)
    new = dataclasses.replace(old, session=b"\x02" * 16)
    xs = uniform_inputs(3, 4)
    old_server = MaskingServer(1, range(3), 4, old, ids.roster, ids.server_key)
    old_client = MaskingClient(0, 1, old, ids.client_keys[0], ids.roster, xs[0])
    old_down = old_server.start()
    old_adv = old_client.handle(old_down[0])
    new_server = MaskingServer(1, range(3), 4, new, ids.roster, ids.server_key)
    new_server.start()
    with pytest.raises(ProtocolError, match=r"client 0: signature check failed"):
        new_server.receive(0, old_adv)
    new_client = MaskingClient(0, 1, new, ids.client_keys[0], ids.roster, xs[0])
    with pytest.raises(ProtocolError, match=r"client 0: signature check failed"):
        new_client.handle(old_down[0])
    key = bytes(32)
    ct = encrypt_shares(key, 1, 0, 1, bytes(66), bytes(66), session=old.session)
    with pytest.raises(InvalidTag):
        decrypt_shares(key, 1, 0, 1, ct, session=new.session)
    assert decrypt_shares(key, 1, 0, 1, ct, session=old.session) == (bytes(66), bytes(66))
    assert derive_key(key, b"mask", 1, session=old.session) != derive_key(
        key, b"mask", 1, session=new.session
    )
    assert b_commitment(1, 0, key, old.session) != b_commitment(1, 0, key, new.session)


# ------------------------------------------------------------------------- quantisation


@FAST
@given(
    n=st.integers(1, 50),
    d=st.integers(1, 30),
    bits=st.integers(12, 62),
    clip=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**32),
)
def test_quantization_sum_within_bound(n: int, d: int, bits: int, clip: float, seed: int) -> None:
    if ((1 << bits) - 1) // n < 16:
        with pytest.raises(ValueError, match=r"secure_aggregation\.bits"):
            quantization_params(bits, clip, n)
        return
    p = quantization_params(bits, clip, n)
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1.5 * clip, 1.5 * clip, d) for _ in range(n)]
    total = np.zeros(d, dtype=np.uint64)
    for x in xs:
        q = quantize(x, p, rng.bytes(32))
        assert int(q.max()) <= p.levels
        total += q.astype(np.uint64)
    assert int(total.max()) < 1 << bits  # the sum cannot wrap
    got = dequantize_sum(total, p, n)
    want = sum(np.clip(x, -clip, clip) for x in xs)
    assert np.max(np.abs(got - want)) <= quantization_error_bound(p, n)


def test_stochastic_rounding_is_unbiased_and_encoding_round_trips() -> None:
    p = quantization_params(16, 1.0, 4)
    x = np.full(20000, 0.123456)
    q = quantize(x, p, b"\x01" * 32)
    est = dequantize_sum(q.astype(np.uint64), p, 1)
    assert abs(est.mean() - 0.123456) < 3 * p.step / math.sqrt(x.size)
    for bits in (20, 32, 40, 62):
        words = np.arange(7, dtype=np.uint64) * 12345 % (1 << bits)
        w = words.astype(np.uint32) if bits <= 32 else words
        assert np.array_equal(decode_words(encode_words(w, bits), 7, bits), w)


# -------------------------------------------------------------------------------- graph


@pytest.mark.parametrize("n,k", [(10, 4), (11, 3), (12, 3), (30, 6), (5, 8)])
def test_graph_is_regular_symmetric_and_public(n: int, k: int) -> None:
    g = build_graph(3, range(n), k)
    again = build_graph(3, list(reversed(range(n))), k)
    expect = n - 1 if k >= n - 1 else (k + 1 if k % 2 and n % 2 else k)
    assert g.degree == expect
    for u in range(n):
        nb = g.neighbours(u)
        assert len(nb) == expect and u not in nb
        assert all(u in g.neighbours(v) for v in nb)
        assert nb == again.neighbours(u)
    assert g.is_connected(range(n))
    if not g.complete:
        other = build_graph(4, range(n), k)
        assert any(g.neighbours(u) != other.neighbours(u) for u in range(n))


# ---------------------------------------------------------------------------- hygiene


def test_no_numpy_rng_in_masking_code() -> None:
    root = Path(__file__).resolve().parents[1] / "securefed" / "secagg"
    files = [*sorted((root / "masking").glob("*.py")), root / "keys.py"]
    pattern = re.compile(r"np\.random|numpy\.random|import random\b|random\.(seed|random)")
    for f in files:
        assert not pattern.search(f.read_text()), f"{f.name} uses a non-CSPRNG generator"
    assert not any(
        "assert " in line.split("#")[0]
        for f in files
        for line in f.read_text().splitlines()
        if line.strip().startswith("assert ")
    )


# ------------------------------------------------ the semi-honest protocol (no consistency stage)


def test_semi_honest_round_skips_the_consistency_stage_and_sums_the_same() -> None:
    """``consistency_check=False``: four stages, no ConsistencyRequest/Signature on the wire,
    the same survivors and sum (within the grid) as the five-stage round, with a dropout
    recovered and a drop 'at the consistency check' treated as a drop before unmasking."""
    xs = uniform_inputs(6, 40, 3)
    drops = {1: Stage.MASKED_INPUT, 4: Stage.CONSISTENCY_CHECK}
    results = {}
    for check in (True, False):
        params = MaskingParams(0.5, None, 32, 1.0, consistency_check=check)
        proto = MaskingAggregation(params, ephemeral_identities(6))
        results[check] = proto.aggregate(ROUND, xs, drops)
        view = proto.last_server_view
        assert view is not None
        stages = {m.stage for m in view.messages}
        assert (Stage.CONSISTENCY_CHECK in stages) == check
    full, semi = results[True], results[False]
    assert full.survivors == semi.survivors == (0, 2, 3, 4, 5)  # 4: late dropout
    assert semi.info["recovered_clients"] == [1]
    want = sum(xs[c] for c in semi.survivors)
    assert np.max(np.abs(semi.total - want)) <= semi.info["quantization_error_bound"]


def test_a_client_assuming_a_malicious_server_refuses_an_unsigned_unmask_request() -> None:
    """Attack: a server runs the semi-honest protocol (unmask request right after the masked
    inputs, no signatures on the survivor set) against clients configured for a malicious
    server. Each refuses before revealing any share: the skip needs the client's consent."""
    ids = ephemeral_identities(4)
    xs = uniform_inputs(4, 8)
    semi = MaskingParams(0.5, None, 32, 1.0, consistency_check=False)
    full = MaskingParams(0.5, None, 32, 1.0)
    server = MaskingServer(ROUND, range(4), 8, semi, ids.roster, ids.server_key)
    clients = {
        c: MaskingClient(c, ROUND, full, ids.client_keys[c], ids.roster, xs[c]) for c in range(4)
    }
    down = server.start()
    for _ in range(3):  # advertise, share, masked input: the same in both protocols
        down = _step(server, clients, down)
    assert server.stage == Stage.UNMASKING
    assert isinstance(decode_message(down[0], 0), UnmaskRequest)
    for c in range(4):
        with pytest.raises(ProtocolError, match=rf"client {c}: stage.*UnmaskRequest"):
            clients[c].handle(down[c])
        assert clients[c].state.revealed_b == set() and clients[c].state.revealed_s == set()


def test_a_semi_honest_client_still_checks_the_survivor_set() -> None:
    """Without signatures the client still refuses a survivor set below t, one that lists a
    neighbour that sent it no shares, and a request for both kinds of share of one peer."""
    params = MaskingParams(3.0, None, 32, 1.0, consistency_check=False)
    server, clients, ids, _ = _roles(4, 8, params)
    down = server.start()
    for _ in range(3):
        down = _step(server, clients, down)
    req = decode_message(down[0], 0)
    assert isinstance(req, UnmaskRequest) and req.signatures == ()
    small = dataclasses.replace(req, survivors=(0, 1))
    with pytest.raises(ProtocolError, match="client 0: threshold"):
        clients[0].handle(small.signed_bytes(ids.server_key))
    both = dataclasses.replace(req, dropped=(2,))
    with pytest.raises(ProtocolError, match=r"client 0: share request.*both.*client 2"):
        clients[0].handle(both.signed_bytes(ids.server_key))
    # the honest request is answered, and the round completes
    for c in range(4):
        server.receive(c, clients[c].handle(down[c]))
    server.close_stage()
    assert server.output is not None and server.output.survivors == (0, 1, 2, 3)
