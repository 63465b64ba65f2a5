"""Refresh: a challenger trained on the live store with inverse-propensity weights replaces the
champion only if it catches more disagreements at equal offload on the newest held-out slice."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import pytest

from fallwatch import dmd_store
from fallwatch.schemas import AlertEvent, DmdRecord, EventKind, EventOutcome, EventType, encode
from switcher.calibrate import threshold_for_fraction
from switcher.model import Switcher, SwitcherConfig, read_card, write_card
from switcher.planted import Planted, Rule, planted
from switcher.publish import current_version, history, publish
from switcher.records import DmdMeta, write_arrays
from switcher.refresh import (Score, _better, more_errors_p, outcome_labels, refresh, weighted_discordant,
                              weighted_threshold)
from switcher.train import train_switcher
from tests.faults import fallwatch

DIM, EDGE, QUESTIONS = 16, "planted-edge", ("Is the person falling?",)
RULE_A, RULE_B = Rule(0, 1), Rule(2, 3)
BUDGET, AUDIT = 0.25, 0.3


@pytest.fixture(scope="module")
def champion_dir(tmp_path_factory):
    """A switcher trained offline on rule A and calibrated to offload 25%."""
    root = tmp_path_factory.mktemp("champion")
    rng = np.random.default_rng(5)
    meta = DmdMeta(edge_model_id=EDGE, questions=QUESTIONS, feature_dim=DIM, cloud_model_id="c", cloud_question="?",
                   dataset="planted", split="x", kind="image")
    sets = {}
    for name, n in (("train", 1200), ("val", 300)):
        p = planted(rng, n, DIM, RULE_A)
        sets[name] = write_arrays(root / name, DmdMeta(**{**asdict(meta), "split": name}), p.features, p.edge_p,
                                  p.cloud_p, p.labels)
    cfg = SwitcherConfig(in_features=DIM, seed=0, batch_size=64, lr=1e-3, max_epochs=60)
    train_switcher(sets["train"], sets["val"], root / "ckpt", cfg)
    sw = Switcher.load(root / "ckpt")
    card = read_card(root / "ckpt")
    card["threshold"] = threshold_for_fraction(sw.agreement(sets["val"].features), BUDGET)
    card["calibration"] = {"method": "budget", "offload_fraction": BUDGET}
    write_card(root / "ckpt", card)
    return root / "ckpt"


def route_traffic(r, keys, settings, champ: Switcher, rule: Rule, n: int, seed: int, noise: bool = False,
                  audit_fraction: float = AUDIT, truth: bool = False, flips: float = 0.0) -> int:
    """Traffic through the champion's routing into the store: offloads (inclusion 1) and audits
    (with ``truth``, each carrying its ground truth, as a replay's frames do)."""
    rng = np.random.default_rng(seed)
    p = planted(rng, n, DIM, rule, flips)
    if noise:  # disagreements unrelated to the features
        flip = rng.random(n) < 0.25
        p = Planted(p.features, p.labels, np.where(p.labels ^ flip, 0.8, 0.2), p.cloud_p, flip)
    offload = champ.agreement(p.features) < champ.threshold
    audit = ~offload & (rng.random(n) < audit_fraction)
    pipe = r.pipeline(transaction=False)
    for i in np.flatnonzero(offload | audit):
        rec = DmdRecord(frame_id=f"cam1:{seed}:{i}", camera_id="cam1", captured_at=1.7e9 + i, edge_p_fall=p.edge_p[i],
                        cloud_p_fall=p.cloud_p[i], agree=bool(not p.disagree[i]),
                        route="offload" if offload[i] else "audit", inclusion=1.0 if offload[i] else audit_fraction,
                        edge_model_id=EDGE, questions=list(QUESTIONS), feature_dim=DIM,
                        gt_fall=bool(p.labels[i]) if truth else None)
        dmd_store.append(pipe, keys, settings.dmd, rec, dmd_store.features_to_bytes(p.features[i]))
    pipe.execute()
    return int((offload | audit).sum())


def test_weighted_threshold_holds_the_asked_share_of_weight() -> None:
    scores = np.linspace(0, 1, 101)
    assert np.mean(scores < weighted_threshold(scores, np.ones(101), 0.2)) == pytest.approx(0.2, abs=0.01)
    w = np.where(scores < 0.5, 1.0, 3.0)  # items above 0.5 stand for three each
    t = weighted_threshold(scores, w, 0.25)
    assert (w * (scores < t)).sum() / w.sum() == pytest.approx(0.25, abs=0.02)
    assert not (scores < weighted_threshold(scores, w, 0.0)).any()
    assert (scores < weighted_threshold(scores, w, 1.0)).all()


def test_refresh_promotes_a_challenger_that_learned_the_new_traffic(settings, r, keys, champion_dir, tmp_path) -> None:
    champ = Switcher.load(champion_dir)
    settings = settings.model_copy(update={"switcher": settings.switcher.model_copy(update={"checkpoint": champion_dir})})
    route_traffic(r, keys, settings, champ, RULE_B, 4000, seed=1)
    report = refresh(r, keys, settings, promote=True, out=tmp_path / "challenger")
    assert report.budget == BUDGET and report.holdout > 0 and report.train > report.holdout
    assert report.challenger.offload_fraction == pytest.approx(report.champion.offload_fraction, abs=0.03)
    assert report.challenger.catch > report.champion.catch + settings.dmd.refresh_margin, report.reason
    assert report.better and report.promoted
    assert current_version(r, keys) == report.challenger.version
    assert history(r, keys) == [report.challenger.version, champ.version]  # the champion stays for rollback
    card = read_card(tmp_path / "challenger")
    assert card["calibration"]["budget"] == BUDGET and 0 < card["calibration"]["expected_agreement"] <= 1


def test_refresh_refuses_a_worse_challenger(settings, r, keys, champion_dir, tmp_path, redis_url) -> None:
    champ = Switcher.load(champion_dir)
    v0 = publish(r, keys, champion_dir)
    settings = settings.model_copy(update={"dmd": settings.dmd.model_copy(update={"refresh_holdout": 0.3})})
    route_traffic(r, keys, settings, champ, RULE_A, 2500, seed=2, noise=True)  # older records: noise
    route_traffic(r, keys, settings, champ, RULE_A, 2500, seed=3)  # newest (held out): rule A again
    report = refresh(r, keys, settings, promote=True, out=tmp_path / "worse")
    assert report.champion.catch > report.challenger.catch, report.reason
    assert not report.better and not report.promoted
    assert current_version(r, keys) == v0 and history(r, keys) == [v0]
    env = {**os.environ, "FALLWATCH_REDIS__URL": redis_url, "PYTHONPATH": os.getcwd()}
    done = fallwatch("switcher", "refresh", "--out", str(tmp_path / "cli"), "--epochs", "5", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["promoted"] is False
    r.delete(keys.dmd_store())
    empty = fallwatch("switcher", "refresh", env=env)
    assert empty.returncode == 2 and "no records" in empty.stderr and "Traceback" not in empty.stderr


def test_caregiver_outcomes_are_ground_truth(r, keys) -> None:
    for outcome, frames in ((EventOutcome.CONFIRMED_FALL, ["cam1:1", "cam1:2"]), (EventOutcome.FALSE_ALARM, ["cam1:7"]),
                            (EventOutcome.NOT_SURE, ["cam1:9"])):
        ev = AlertEvent(type=EventType.END, kind=EventKind.FALL, camera_id="cam1", started_at=1.7e9, frame_ids=frames,
                        outcome=outcome)
        r.xadd(keys.alerts_stream(), encode(ev))
    assert outcome_labels(r, keys) == {"cam1:1": True, "cam1:2": True, "cam1:7": False}


def test_ground_truth_refuses_a_challenger_only_when_it_is_significantly_worse() -> None:
    # McNemar's exact test on the items only one of the two gets wrong: binomial tails at 1/2
    assert more_errors_p(0, 0) == 1.0 and more_errors_p(3, 0) == 0.125 and more_errors_p(5, 0) == 1 / 32
    assert more_errors_p(15, 10) == pytest.approx(0.2122, abs=1e-4)
    champion = Score("cp", 0.5, 0.3, 0.26, 893, 47)
    challenger = Score("ch", 0.5, 0.3, 0.79, 893, 52)
    assert _better(challenger, champion, 0.02, more_errors_p(15, 10))  # 5 more errors of 893: noise
    assert not _better(challenger, champion, 0.02, more_errors_p(20, 5))  # 15 more: not chance
    assert not _better(Score("ch", 0.5, 0.3, 0.27, 893, 40), champion, 0.02, 1.0)  # catches too little more


def test_discordant_items_count_as_the_traffic_they_stand_for() -> None:
    ch = np.array([True, True, False, False, True])
    cp = np.array([False, False, True, False, True])
    assert weighted_discordant(ch, cp, np.ones(5)) == (2, 1)  # equal weights: the raw counts
    # one champion-only item audited at 2% stands for 50: it outweighs the challenger's two offloads,
    # and the three weighted items are worth about one item of evidence
    assert weighted_discordant(ch, cp, np.array([1.0, 1.0, 50.0, 1.0, 1.0])) == (0, 1)
    assert weighted_discordant(ch & False, cp & False, np.ones(5)) == (0, 0)


def test_ground_truth_on_the_champions_own_offloads_does_not_keep_it(settings, r, keys, champion_dir,
                                                                     tmp_path) -> None:
    """The held-out records are the champion's offloads (all sent to the cloud, which is right) and a
    2% sample of the rest: counted raw, the champion makes fewer ground-truth errors; counted as
    the traffic they stand for, the challenger that learned the new traffic makes fewer."""
    champ = Switcher.load(champion_dir)
    settings = settings.model_copy(update={"switcher": settings.switcher.model_copy(update={"checkpoint": champion_dir})})
    route_traffic(r, keys, settings, champ, RULE_B, 15000, seed=4, audit_fraction=0.02, truth=True, flips=0.05)
    report = refresh(r, keys, settings, promote=True, out=tmp_path / "challenger")
    ch, cp = report.challenger, report.champion
    assert ch.gt_items > 0 and ch.gt_errors > cp.gt_errors, report.reason  # raw counts favour the champion
    assert ch.gt_error_rate < cp.gt_error_rate and report.more_errors_p > 0.5, report.reason  # weighted: it is better
    assert ch.catch > cp.catch + settings.dmd.refresh_margin and report.promoted, report.reason
