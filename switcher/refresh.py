"""Refresh: train a challenger switcher on the live store and promote it only if it is better.

1. Split the store by time: the newest ``dmd.refresh_holdout`` share is held out; neither the
   champion (trained offline) nor the challenger trains on it. The older records are split
   80/20 (seeded) into train and early-stopping data.
2. Train with inverse-propensity weights, 1 / inclusion: an audit sampled at 2% stands for 50
   edge-decided items, an offload for itself. The weighted data have the traffic's
   distribution, not the router's (which offloads the hard items and audits few easy ones).
3. Calibrate the challenger to the current offload budget: ``--budget``, else the champion's
   calibrated offload fraction, else its live (weighted) offload rate on the store.
4. Compare both on the held-out slice at that same weighted offload fraction: the (weighted)
   share of edge/cloud disagreements each would send to the cloud ("catch"). Where caregivers
   resolved events (confirmed fall / false alarm) or replays carry ground truth, the errors of
   the combined verdict against it are counted as well.
5. Promotion needs ``catch(challenger) >= catch(champion) + dmd.refresh_margin`` and no
   significantly more ground-truth errors than the champion: of the held-out items with ground truth
   that exactly one of the two gets wrong, the challenger's share must not be so large that chance
   explains it less than 5% of the time (McNemar's exact test, one-sided). Comparing raw counts
   instead refused a challenger that caught 79% of disagreements against the champion's 26% over 52
   errors against 47 of 893. The items count with the same inverse-propensity weights as the
   catch (scaled to their effective number, Kish's n_eff, for the exact test): the held-out records
   are the champion's own offloads and a sample of the rest, so unweighted the champion, which by
   construction sent every one of its offloads to the (right) cloud, is favoured. Unweighted, a
   benchmark's challenger catching 71% of disagreements against 26% was refused on 35 items alone
   wrong against 15 (p 0.003); on a replica of that traffic (tests) the weighted error rates were
   9.0% against 20.8%. Promotion publishes the challenger
   (edge workers hot-reload it); the champion stays in the history for ``fallwatch switcher rollback``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fallwatch.keys import Keys
from fallwatch.schemas import AlertEvent, EventOutcome, decode
from fallwatch.settings import Settings
from switcher.live import LiveData, read_store
from switcher.model import Switcher, SwitcherConfig, read_card, write_card
from switcher.publish import current_version, history, load_published, publish
from switcher.records import DmdError
from switcher.train import train_switcher

log = structlog.get_logger(__name__)

MIN_RECORDS = 40
GT_ALPHA = 0.05  # a challenger significantly worse on ground truth at this level is not promoted


class RefreshError(ValueError):
    """The store cannot support a refresh (too few records, no disagreements)."""


def weighted_threshold(scores: np.ndarray, weights: np.ndarray, fraction: float) -> float:
    """The threshold with which ``scores < threshold`` holds ``fraction`` of the total weight."""
    order = np.argsort(scores, kind="stable")
    s, cum = np.asarray(scores, dtype=np.float64)[order], np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    k = int(np.searchsorted(cum, fraction * cum[-1] - 1e-9, side="left")) + 1  # items needed to reach it
    if fraction <= 0:
        return float(min(0.0, s[0]))
    if k >= s.size:
        return float(max(1.0, np.nextafter(s[-1], np.inf)))
    return float((s[k - 1] + s[k]) / 2)


@dataclass(frozen=True)
class Score:
    """One switcher on the held-out slice at a given weighted offload fraction."""

    version: str | None
    threshold: float
    offload_fraction: float  # weighted: the traffic's share sent to the cloud
    catch: float  # weighted share of edge/cloud disagreements sent to the cloud
    gt_items: int
    gt_errors: int  # combined-verdict errors against ground truth (caregiver outcomes, replays)
    gt_error_rate: float = 0.0  # the same, weighted: the traffic's share of wrong verdicts among items with truth


def score_on(agreement: np.ndarray, hold: LiveData, fraction: float, labels: np.ndarray | None,
             version: str | None) -> tuple[Score, np.ndarray]:
    """The switcher's score, and per held-out item with ground truth whether its combined verdict is wrong."""
    w = hold.weights
    t = weighted_threshold(agreement, w, fraction)
    sent = agreement < t
    disagree = ~hold.data.agree
    catch = float((w * (sent & disagree)).sum() / max((w * disagree).sum(), 1e-12))
    wrong = combined_wrong(sent, hold, labels)
    wk = truth_weights(hold, labels)
    rate = float((wk * wrong).sum() / wk.sum()) if wrong.size else 0.0
    return Score(version, t, float((w * sent).sum() / w.sum()), catch, len(wrong), int(wrong.sum()), rate), wrong


def truth_weights(hold: LiveData, labels: np.ndarray | None) -> np.ndarray:
    """The inverse-propensity weights of the held-out items with ground truth (``combined_wrong``'s order)."""
    return np.zeros(0) if labels is None else hold.weights[labels >= 0]


def combined_wrong(sent: np.ndarray, hold: LiveData, labels: np.ndarray | None) -> np.ndarray:
    """Per held-out item with ground truth: whether the combined verdict (the cloud's where ``sent``,
    else the edge's) is wrong."""
    if labels is None:
        return np.zeros(0, dtype=bool)
    known = labels >= 0
    combined = np.where(sent, hold.data.column("cloud_pred", bool), hold.data.column("edge_pred", bool))
    return combined[known] != (labels[known] == 1)


def weighted_discordant(ch_wrong: np.ndarray, cp_wrong: np.ndarray, weights: np.ndarray) -> tuple[int, int]:
    """(challenger alone wrong, champion alone wrong) as counts for McNemar's test: the discordant
    items' weighted shares of their effective number (Kish: (sum w)^2 / sum w^2). Equal weights
    give the raw counts."""
    only_ch, only_cp = ch_wrong & ~cp_wrong, cp_wrong & ~ch_wrong
    w = weights[only_ch | only_cp]
    if w.size == 0:
        return 0, 0
    n_eff = int(round(w.sum() ** 2 / (w ** 2).sum()))
    ch = int(round(n_eff * weights[only_ch].sum() / w.sum()))
    return ch, n_eff - ch


def more_errors_p(challenger_only: int, champion_only: int) -> float:
    """McNemar's exact one-sided p: the chance of the challenger being alone wrong this often or
    more among the items exactly one of the two gets wrong, were both equally good."""
    n = challenger_only + champion_only
    return sum(math.comb(n, k) for k in range(challenger_only, n + 1)) / 2 ** n


def outcome_labels(client: Any, keys: Keys) -> dict[str, bool]:
    """Ground truth per frame from events caregivers resolved: confirmed fall or false alarm."""
    labels: dict[str, bool] = {}
    for _, fields in client.xrange(keys.alerts_stream()):
        msg, _ = decode(fields)
        if isinstance(msg, AlertEvent) and msg.outcome in (EventOutcome.CONFIRMED_FALL, EventOutcome.FALSE_ALARM):
            for fid in msg.frame_ids:
                labels[fid] = msg.outcome is EventOutcome.CONFIRMED_FALL
    return labels


def truth(hold: LiveData, outcomes: dict[str, bool]) -> np.ndarray | None:
    """1 fall / 0 no fall / -1 unknown per held-out item: caregiver outcomes first, then replay truth."""
    values = []
    for item in hold.data.items:
        label = outcomes.get(item.id, item.label)
        values.append(-1 if label is None else int(label))
    arr = np.array(values, dtype=int)
    return arr if (arr >= 0).any() else None


@dataclass
class RefreshReport:
    records: int
    train: int
    val: int
    holdout: int
    budget: float
    margin: float
    champion: Score | None
    challenger: Score
    challenger_path: str
    better: bool
    promoted: bool = False
    reason: str = ""
    # ground truth: items only the challenger gets wrong, only the champion (weighted), and more_errors_p of them
    discordant: tuple[int, int] = (0, 0)
    more_errors_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split(live: LiveData, holdout: float, seed: int) -> tuple[LiveData, LiveData, LiveData]:
    """(train, val, held-out): the newest share held out, the rest split 80/20 at random."""
    n = len(live.records)
    n_hold = max(1, int(round(n * holdout)))
    older = np.arange(n - n_hold)
    rng = np.random.default_rng(seed)
    val_idx = set(rng.choice(older, size=max(1, len(older) // 5), replace=False).tolist())
    is_val = np.array([i in val_idx for i in range(n)])
    is_old = np.arange(n) < n - n_hold
    return live.subset(is_old & ~is_val), live.subset(is_old & is_val), live.subset(~is_old)


def _pos_weight(live: LiveData) -> float | None:
    w, agree = live.weights, live.data.agree
    pos, neg = float(w[agree].sum()), float(w[~agree].sum())
    return neg / pos if pos and neg else None


def champion(client: Any, keys: Keys, settings: Settings, model_id: str, questions) -> Switcher | None:
    version = current_version(client, keys)
    if version is not None:
        return load_published(client, keys, version, model_id, questions)
    if settings.switcher.checkpoint is not None:
        return Switcher.load(settings.switcher.checkpoint, model_id, questions)
    return None


def budget_for(champ: Switcher | None, live: LiveData, asked: float | None) -> float:
    if asked is not None:
        return asked
    calibration = (champ.card.get("calibration") or {}) if champ is not None else {}
    if calibration.get("offload_fraction") is not None:
        return float(calibration["offload_fraction"])
    if champ is not None and champ.threshold is not None:
        w = live.weights
        return float((w * (champ.agreement(live.data.features) < champ.threshold)).sum() / w.sum())
    raise RefreshError("no offload budget: pass --budget, or calibrate the champion switcher")


def train_challenger(train: LiveData, val: LiveData, out: Path, seed: int, epochs: int) -> Switcher:
    cfg = SwitcherConfig(in_features=train.data.meta.feature_dim, seed=seed, max_epochs=epochs,
                         pos_weight=_pos_weight(train), batch_size=64, lr=1e-3)
    train_switcher(train.data, val.data, out, cfg, weights=(train.weights, val.weights))
    return Switcher.load(out)


def calibrate_challenger(out: Path, sw: Switcher, data: LiveData, budget: float) -> Switcher:
    t = weighted_threshold(sw.agreement(data.data.features), data.weights, budget)
    card = read_card(out)
    card["threshold"] = t
    card["calibration"] = {"method": "budget", "budget": budget, "offload_fraction": budget, "threshold": t,
                           "weighted": True, "expected_agreement": expected_agreement(sw, data, t),
                           "data": {"dataset": data.data.meta.dataset, "split": "live", "items": len(data.records)}}
    write_card(out, card)
    return Switcher.load(out)


def expected_agreement(sw: Switcher, data: LiveData, threshold: float) -> float:
    """The weighted agreement rate of the items this switcher keeps on the edge (the drift monitor's baseline)."""
    kept = sw.agreement(data.data.features) >= threshold
    w = data.weights
    return float((w * (kept & data.data.agree)).sum() / max((w * kept).sum(), 1e-12))


def check_store(live: LiveData) -> None:
    if len(live.records) < MIN_RECORDS:
        raise RefreshError(f"the live DMD store holds {len(live.records)} records; refresh needs at least {MIN_RECORDS}")
    if live.data.agree.all() or not live.data.agree.any():
        raise RefreshError("the live DMD store holds no disagreements (or only): nothing to learn from yet")


def refresh(client: Any, keys: Keys, settings: Settings, promote: bool = False, budget: float | None = None,
            seed: int = 0, epochs: int = 60, out: Path | None = None, since: float | None = None) -> RefreshReport:
    """Train, calibrate and compare a challenger; with ``promote``, publish it if it is better.
    ``since``: only records from then on (e.g. from the start of a drift event)."""
    try:
        live = read_store(client, keys, settings, since)
    except DmdError as exc:
        raise RefreshError(str(exc)) from None
    check_store(live)
    meta = live.data.meta
    champ = champion(client, keys, settings, meta.edge_model_id, meta.questions)
    train, val, hold = split(live, settings.dmd.refresh_holdout, seed)
    target = budget_for(champ, train, budget)
    out = Path(out or settings.dmd.checkpoints_dir / f"refresh-{time.strftime('%Y%m%dT%H%M%S')}")
    challenger = calibrate_challenger(out, train_challenger(train, val, out, seed, epochs), train, target)
    labels = truth(hold, outcome_labels(client, keys))
    ch, ch_wrong = score_on(challenger.agreement(hold.data.features), hold, target, labels, challenger.version)
    cp, discordant = None, (0, 0)
    if champ is not None:
        cp, cp_wrong = score_on(champ.agreement(hold.data.features), hold, target, labels, champ.version)
        discordant = weighted_discordant(ch_wrong, cp_wrong, truth_weights(hold, labels))
    p = more_errors_p(*discordant)
    report = RefreshReport(len(live.records), len(train.records), len(val.records), len(hold.records), target,
                           settings.dmd.refresh_margin, cp, ch, str(out),
                           better=_better(ch, cp, settings.dmd.refresh_margin, p), discordant=discordant,
                           more_errors_p=round(p, 4))
    report.reason = _reason(report)
    if promote and report.better:
        _promote(client, keys, champ, settings, out)
        report.promoted = True
    log.info("switcher_refresh", promoted=report.promoted, better=report.better, challenger_catch=ch.catch,
             champion_catch=None if cp is None else cp.catch, budget=target)
    return report


def _better(ch: Score, cp: Score | None, margin: float, more_errors: float) -> bool:
    if cp is None:
        return True
    return ch.catch >= cp.catch + margin and more_errors >= GT_ALPHA


def _reason(rep: RefreshReport) -> str:
    ch, cp = rep.challenger, rep.champion
    if cp is None:
        return "no champion: the challenger is the first live switcher"
    verdict = "better" if rep.better else "not better"
    return (f"challenger catches {100 * ch.catch:.1f}% of held-out disagreements at {100 * ch.offload_fraction:.1f}% "
            f"offload, champion {100 * cp.catch:.1f}% at {100 * cp.offload_fraction:.1f}% (margin "
            f"{100 * rep.margin:.1f} pp; ground-truth errors {100 * ch.gt_error_rate:.1f}% vs "
            f"{100 * cp.gt_error_rate:.1f}% of the traffic ({ch.gt_errors} vs {cp.gt_errors} of {ch.gt_items} items), "
            f"{rep.discordant[0]} vs {rep.discordant[1]} alone (weighted), p {rep.more_errors_p:.3g}): {verdict}")


def _promote(client: Any, keys: Keys, champ: Switcher | None, settings: Settings, out: Path) -> None:
    if champ is not None and not history(client, keys) and champ.path.is_dir():
        publish(client, keys, champ.path, source="champion")  # so rollback can return to it
    publish(client, keys, out, source="refresh")

