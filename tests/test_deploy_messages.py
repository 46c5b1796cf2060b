"""Fewer Flower messages per round (issue 13, item 3), attacked the way a malicious coordinator
would: the next round's keys ride on this round's unmasking, and, only where a site opts in to an
honest-but-curious coordinator, the consistency check is skipped.

The real :class:`~securefed.deploy.coordinator.Coordinator` and site handlers run over the
in-process transport of :mod:`tests.test_deploy_policy` (no Flower process). The saving must not
change what a site trains, charges or refuses: a round's start is checked exactly as before (run,
signature, replay, cohort) wherever it travels, and a round is trained once.
"""

from __future__ import annotations

import json
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from securefed.deploy.coordinator import Coordinator, CoordinatorOptions
from securefed.deploy.node import PolicyError
from securefed.secagg.masking.messages import Stage
from tests.deploy_helpers import (
    PolicyNet,
    deliver,
    ledger_entries,
    policy_cfg,
    policy_sites,
    setup_content,
)

#: deployment tests (Flower processes, sites, the deploy protocol): in `make test`, left out
#: of `make test-unit`
pytestmark = pytest.mark.deploy

UNMASK = f"train.{Stage.UNMASKING}"
SHARE = f"train.{Stage.SHARE_KEYS}"
ADVERTISE = f"train.{Stage.ADVERTISE_KEYS}"


def _run(tmp: Path, net: PolicyNet, rounds: int, *, ahead: bool = True) -> Any:
    opts = CoordinatorOptions(run_dir=tmp / "run", keys_dir=tmp / "keys",
                              min_sites=len(net.sites), advertise_ahead=ahead)
    coord = Coordinator(policy_cfg(federation={"rounds": rounds}), opts, net)
    return coord, coord.run()


def _messages_per_round(net: PolicyNet) -> dict[int, Counter[str]]:
    out: dict[int, Counter[str]] = {}
    for message_type, _node, content in net.sent:
        if message_type.startswith("train."):
            out.setdefault(int(content["round"]), Counter())[message_type] += 1
    return out


def test_keys_advertised_ahead_save_one_message_per_round_and_change_no_charge(
    tmp_path: Path,
) -> None:
    """3 rounds: round 1 has the five stages; rounds 2 and 3 have no advertise_keys message
    (their keys came with the previous unmasking replies) and the sites train on the key
    broadcast. Every round completes with every site and each site's ledger holds the same
    charges as a run without the saving."""
    net = PolicyNet(policy_sites(tmp_path / "a", 3))
    _, res = _run(tmp_path / "a", net, 3)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 3
    per_round = _messages_per_round(net)
    assert per_round[1][ADVERTISE] == 3 and len(per_round[1]) == 5
    for rnd in (2, 3):
        assert ADVERTISE not in per_round[rnd] and len(per_round[rnd]) == 4
    trained_on = {(t, int(c["round"])) for t, _n, c in net.sent if "broadcast_keys" in c}
    assert trained_on == {(ADVERTISE, 1), (SHARE, 2), (SHARE, 3)}
    # the unmasking of rounds 1 and 2 carried the next round's start; round 3's did not
    carried = {int(c["round"]) for t, _n, c in net.sent if t == UNMASK and "next_secagg" in c}
    assert carried == {1, 2}

    plain = PolicyNet(policy_sites(tmp_path / "b", 3))
    _, res_plain = _run(tmp_path / "b", plain, 3, ahead=False)
    assert all(len(c) == 5 for c in _messages_per_round(plain).values())
    assert [m["participants"] for m in res_plain.metrics] == [[0, 1, 2]] * 3
    drop = ("epsilon_after", "update_sha256", "run_id", "time", "noise_key_id")
    for node in net.sites:
        a, b = ledger_entries(net.sites[node]), ledger_entries(plain.sites[node])
        assert len(a) == len(b) == 3
        assert [{k: v for k, v in e.items() if k not in drop} for e in a] == [
            {k: v for k, v in e.items() if k not in drop} for e in b
        ]


def test_a_next_round_start_for_a_trained_round_is_refused(tmp_path: Path) -> None:
    """Attack: replay round 1's (validly signed) RoundStart as the 'next' round carried by
    round 1's unmasking request, to get a second set of round-1 keys and a second round-1 sum.
    Each site answers its unmasking shares but refuses the start (round at or below its last
    trained round); the coordinator's next round then runs on fresh starts."""
    first_start: dict[int, bytes] = {}

    def rewrite(message_type: str, node: int, content: Any) -> Any:
        if message_type == ADVERTISE and int(content["round"]) == 1:
            first_start[node] = content["secagg"]
        if message_type == UNMASK and int(content["round"]) == 1:
            return {**content, "next_round": 1, "next_secagg": first_start[node]}
        return content

    net = PolicyNet(policy_sites(tmp_path, 3), on_send=rewrite)
    _, res = _run(tmp_path, net, 2)
    refusals = [r for t, _n, r in net.replies if t == UNMASK and isinstance(r, dict)
                and "next_refused" in r]
    assert len(refusals) == 3
    assert all("at or below this site's last trained round 1" in r["next_refused"]
               for r in refusals)
    first, second = res.metrics
    assert first["participants"] == [0, 1, 2]
    # the refused keys never reached round 2's server: round 2 drops the sites at
    # advertise_keys (they were sent a start already) and is abandoned, not run twice
    assert second["participants"] == []
    assert all("next_refused" in second["dropout_reasons"][str(c)] or
               "refused" in second["dropout_reasons"][str(c)] for c in (0, 1, 2))
    for site in net.sites.values():
        assert len(ledger_entries(site)) == 1  # nobody trained round 1 twice, nor round 2


def test_a_training_key_broadcast_is_trained_once(tmp_path: Path) -> None:
    """Attack: deliver round 2's key broadcast (which carries the model and makes the site
    train) a second time. The site refuses it and its ledger holds one charge per round."""
    second_try: list[Any] = []

    def replay(message_type: str, node: int, reply: dict[str, Any]) -> dict[str, Any]:
        if message_type == SHARE and node == 101 and not second_try:
            content = next(c for t, n, c in reversed(net.sent) if t == SHARE and n == node)
            if "broadcast_keys" in content:
                second_try.append(deliver(net.sites[node], message_type, content))
        return reply

    net = PolicyNet(policy_sites(tmp_path, 3), on_reply=replay)
    _, res = _run(tmp_path, net, 2)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    (err,) = second_try
    assert isinstance(err, str) and "it trains a round once" in err
    assert len(ledger_entries(net.sites[101])) == 2


def test_a_site_that_refuses_the_next_start_is_dropped_from_that_round_only(
    tmp_path: Path,
) -> None:
    """A site whose keys for round 2 do not arrive (its reply is tampered with) is dropped from
    round 2 at advertise_keys with the reason recorded; round 2 completes with the others, and
    round 3 (started fresh for it) includes it again."""
    def tamper(message_type: str, node: int, reply: dict[str, Any]) -> dict[str, Any]:
        if message_type == UNMASK and node == 102 and int(reply["round"]) == 1:
            return {**reply, "next_secagg": b"\x00" * 40}
        return reply

    sites = policy_sites(tmp_path, 3, min_threshold=Fraction(1, 2), min_cohort=2)
    net = PolicyNet(sites, on_reply=tamper)
    opts = CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=3)
    cfg = policy_cfg(federation={"rounds": 3}, secure_aggregation={"threshold": 0.5})
    res = Coordinator(cfg, opts, net).run()
    one, two, three = res.metrics
    assert one["participants"] == [0, 1, 2]
    assert two["participants"] == [0, 1]
    assert two["dropped_at"] == {"2": Stage.ADVERTISE_KEYS}
    assert "ProtocolError" in two["dropout_reasons"]["2"] or (
        "WireError" in two["dropout_reasons"]["2"]
    )
    assert three["participants"] == [0, 1, 2]
    # site 2 never trained round 2: it advertised keys, then was not asked to train
    entries = ledger_entries(sites[102])
    assert [e["round"] for e in entries] == [1, 3]
    status = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert status["trained"] == [0, 1]


# ------------------------------------------- honest-but-curious coordinator: no consistency check

HBC = {"server_threat": "honest_but_curious"}


def test_a_site_refuses_to_skip_the_consistency_check_unless_it_opted_in(tmp_path: Path) -> None:
    """Attack: a coordinator declares its server honest-but-curious to drop the consistency
    check (then it could show two groups different survivor sets and unmask a site). A site
    with the default policy refuses at setup, naming the field and the node-config key."""
    (site,) = policy_sites(tmp_path, 1).values()
    with pytest.raises(PolicyError, match=(
        r"secure_aggregation.server_threat: 'honest_but_curious' skips .* consistency check.*"
        r"allow-honest-but-curious-server=true"
    )):
        site.setup(setup_content(policy_cfg(secure_aggregation=HBC), "cd" * 16))
    assert not (tmp_path / "site0" / "privacy_ledger.json").exists()


def test_opted_in_sites_run_three_messages_a_round(tmp_path: Path) -> None:
    """Sites that opted in: round 1 has four stages (no consistency check), later rounds three
    (their keys came with the last unmasking); every round sums every site."""
    sites = policy_sites(tmp_path, 3, allow_honest_but_curious_server=True)
    net = PolicyNet(sites)
    opts = CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=3)
    res = Coordinator(policy_cfg(federation={"rounds": 3}, secure_aggregation=HBC), opts, net).run()
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 3
    per_round = _messages_per_round(net)
    assert sorted(per_round[1]) == sorted(
        f"train.{s}" for s in Stage.ORDER if s != Stage.CONSISTENCY_CHECK
    )
    later = sorted([SHARE, "train.masked_input", UNMASK])
    assert sorted(per_round[2]) == sorted(per_round[3]) == later
    assert all(len(ledger_entries(s)) == 3 for s in sites.values())


def test_semi_honest_sites_still_refuse_a_survivor_set_below_min_cohort(tmp_path: Path) -> None:
    """Without the consistency stage the survivor set first reaches a site in the unmasking
    request; a set below the site's min-cohort is refused there, so no share is revealed."""
    sites = policy_sites(tmp_path, 3, min_threshold=Fraction(1, 2),
                         allow_honest_but_curious_server=True)
    net = PolicyNet(sites, drop={2: Stage.MASKED_INPUT})
    opts = CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=3)
    cfg = policy_cfg(secure_aggregation={"threshold": 0.5, **HBC})
    line = Coordinator(cfg, opts, net).run().metrics[0]
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1):
        assert ("survivor set of 2 sites [0, 1] is below this site's min-cohort 3"
                in line["dropout_reasons"][str(cid)])
    assert not [r for t, _n, r in net.replies if t == UNMASK and isinstance(r, dict)]
