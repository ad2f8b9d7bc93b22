"""Single-node findings on why the NMF segments fail on a real basket log (docs/segments.md,
"Findings on the grocer's year"). Reads a warehouse's ``interactions`` with delta-rs, rebuilds the
stage's matrix under variants of its transform / weighting, and factorizes it with the engine's own
numpy HALS rule (lib.nmf.rules), so no Spark and no lock are needed.

    PYTHONPATH=. python bench/segment_findings.py <warehouse> [--part all|decay|spectrum|variants|sketch|assignment|lift_ranking|nextbuy] [--transactions transactions.csv.gz]
"""
from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import pandas as pd
import scipy.sparse as sp
from deltalake import DeltaTable

from lib.nmf.rules import hals_update
from lib.segments.assign import adjusted_rand_index, size_balance

log = logging.getLogger("bench.segment_findings")


def build_matrix(inter: pd.DataFrame, n_users: int, n_items: int, value: str = "score", transform: str = "log1p",
                 cap: float = 0.05, idf: bool = False, row_normalize: bool = True) -> sp.csr_matrix:
    """X as lib.segments.matrix.transform_scores builds it, with ``value`` the interactions column used
    (score: time-decayed weights; n_events: undecayed event count; binary: 1 per pair)."""
    raw = np.ones(len(inter)) if value == "binary" else inter[value].to_numpy(dtype=float)
    f = np.log1p(raw) if transform == "log1p" else raw
    x = sp.csr_matrix((f, (inter.user_idx.to_numpy(), inter.item_idx.to_numpy())), shape=(n_users, n_items))
    item_users = np.asarray((x > 0).sum(axis=0)).ravel()
    users = int(((x > 0).sum(axis=1) > 0).sum())
    weight = np.ones(n_items)
    share = np.where(item_users > 0, item_users / users, 1.0)
    if idf:
        weight *= np.log1p(users / np.maximum(item_users, 1))
    if cap < 1.0:
        weight *= np.minimum(1.0, cap / share)
    x = x @ sp.diags(weight)
    if row_normalize:
        totals = np.asarray(x.sum(axis=1)).ravel()
        x = sp.diags(np.where(totals > 0, 1.0 / np.where(totals > 0, totals, 1), 1.0)) @ x
    return sp.csr_matrix(x)


def nndsvda(x: sp.csr_matrix, k: int, seed: int, power: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """NNDSVDa from a sketch of rank k + 10 after ``power`` rounds of X'X, as lib/nmf/sketch.py
    computes it (single node; the engine transposes this wide matrix, the subspace is the same)."""
    rng = np.random.default_rng([seed, 1])
    omega = rng.standard_normal((x.shape[1], min(k + 10, min(x.shape))))
    for _ in range(power):
        omega = np.linalg.qr(x.T @ (x @ omega))[0]
    q = np.linalg.qr(x @ omega)[0]
    small, values, right = np.linalg.svd(np.asarray((x.T @ q).T), full_matrices=False)
    u, v = q @ small[:, :k], right[:k].T
    w, ht = np.zeros((x.shape[0], k)), np.zeros((x.shape[1], k))
    for j in range(k):
        pos = np.linalg.norm(np.maximum(u[:, j], 0)) * np.linalg.norm(np.maximum(v[:, j], 0))
        neg = np.linalg.norm(np.maximum(-u[:, j], 0)) * np.linalg.norm(np.maximum(-v[:, j], 0))
        sign = 1.0 if pos >= neg else -1.0
        uj, vj = np.maximum(sign * u[:, j], 0), np.maximum(sign * v[:, j], 0)
        scale = math.sqrt(values[j] * max(pos, neg))
        w[:, j] = scale * uj / max(np.linalg.norm(uj), 1e-300)
        ht[:, j] = scale * vj / max(np.linalg.norm(vj), 1e-300)
    mean = float(x.sum() / (x.shape[0] * x.shape[1]))
    w[w == 0], ht[ht == 0] = mean, mean
    return w, ht


def hals(x: sp.csr_matrix, k: int, seed: int, max_iter: int, passes: int = 5, power: int = 7):
    """The engine's HALS loop (one W product, one H product per iteration), history of rel. errors."""
    w, ht = nndsvda(x, k, seed, power)
    xt = sp.csr_matrix(x.T)
    norm_sq = float(x.multiply(x).sum())
    history = []
    for _ in range(max_iter):
        w = hals_update(w, x @ ht, ht.T @ ht, 0.0, 0.0, 1, 0.1)
        ht = hals_update(ht, xt @ w, w.T @ w, 0.0, 0.0, passes, 0.1)
        cross = float(np.sum((x @ ht) * w))
        resid = norm_sq - 2 * cross + float(np.sum((w.T @ w) * (ht.T @ ht)))
        history.append(math.sqrt(max(resid, 0.0) / norm_sq))
    return w, ht, history


def fired_at(history: list[float], tol: float) -> int:
    """The iteration lib.nmf.rules.converged stops at (relative improvement of the error < tol)."""
    for i in range(1, len(history)):
        if (history[i - 1] - history[i]) / history[i - 1] < tol:
            return i + 1
    return len(history)


def assign(w: np.ndarray, ht: np.ndarray, rule: str = "dominant") -> tuple[np.ndarray, np.ndarray]:
    """lib.segments.assign.assign_segments without merging small segments: shares of W[u, l] * sum_i H[l, i]; the largest ("dominant") or
    the largest over the average customer's share ("relative"); affinity; -1 for empty rows."""
    weights = w * ht.sum(axis=0)
    total = weights.sum(axis=1, keepdims=True)
    shares = weights / np.where(total > 0, total, 1)
    has = total[:, 0] > 0
    scores = shares if rule == "dominant" else shares / np.maximum(shares[has].mean(axis=0), 1e-300)
    seg = np.where(has, scores.argmax(axis=1), -1)
    aff = np.where(has, shares[np.arange(len(seg)), np.maximum(seg, 0)], 0.0)
    return seg, aff


def ari(a: np.ndarray, b: np.ndarray) -> float:
    keep = (a >= 0) & (b >= 0)
    table = pd.crosstab(a[keep], b[keep]).to_numpy()
    return adjusted_rand_index(table)


def top_lifts(had: sp.csr_matrix, seg: np.ndarray, ht: np.ndarray, k: int, top: int = 10) -> list[float]:
    """Per segment, the mean lift of its top items by normalized H (lib.segments.profiles.top_item_lifts; an empty
    segment counts 0 here, where the stage's quality row skips it)."""
    assigned = seg >= 0
    rate = np.asarray(had[assigned].mean(axis=0)).ravel()
    lifts = []
    for l in range(k):
        members = seg == l
        if not members.any():
            lifts.append(0.0)
            continue
        items = np.argsort(-ht[:, l], kind="stable")[:top]
        within = np.asarray(had[members][:, items].mean(axis=0)).ravel()
        lifts.append(float(np.mean(np.where(rate[items] > 0, within / np.where(rate[items] > 0, rate[items], 1), 0))))
    return lifts


def evaluate(x, had, k, max_iter, seeds=(7, 8), tol=1e-4, rule="dominant", runs=None, power=7):
    runs = runs or [hals(x, k, s, max_iter, power=power) for s in seeds]
    (w, ht, hist), (w2, ht2, _) = runs
    seg, aff = assign(w, ht, rule)
    seg2, _ = assign(w2, ht2, rule)
    sizes = [int((seg == l).sum()) for l in range(k)]
    largest, entropy = size_balance(sizes, k)
    lifts = top_lifts(had, seg, ht, k)
    return {"k": k, "iters": max_iter, "tol_fires_at": fired_at(hist, tol), "rel_err": hist[-1],
            "largest": largest, "entropy": entropy, "ari": ari(seg, seg2), "min_lift": min(lifts),
            "median_lift": float(np.median(lifts)), "affinity_median": float(np.median(aff[seg >= 0])),
            "flat_share": float(np.mean(aff[seg >= 0] < 1.5 / k))}, (w, ht, hist, seg, aff)


def next_purchase_table(transactions: str, test_weeks: int, k: int = 5) -> pd.DataFrame:
    """Segments fitted on all but the last ``test_weeks`` weeks; per segment, how well its 10 most
    bought products (by households of the segment) predict its households' purchases in the test
    weeks, against the 10 most bought overall: NDCG@10 and hit rate@10 with standard errors."""
    raw = pd.read_csv(transactions, usecols=["household_id", "product_id", "transaction_timestamp"],
                      parse_dates=["transaction_timestamp"])
    cutoff = raw.transaction_timestamp.max() - pd.Timedelta(weeks=test_weeks)
    train, test = raw[raw.transaction_timestamp <= cutoff], raw[raw.transaction_timestamp > cutoff]
    users, items = pd.factorize(train.household_id)[1], pd.factorize(train.product_id)[1]
    u_of, i_of = pd.Index(users), pd.Index(items)
    pairs = (train.assign(user_idx=u_of.get_indexer(train.household_id), item_idx=i_of.get_indexer(train.product_id))
             .groupby(["user_idx", "item_idx"]).size().rename("n_events").reset_index())
    had = sp.csr_matrix((np.ones(len(pairs)), (pairs.user_idx, pairs.item_idx)), shape=(len(users), len(items)))
    buyers = np.asarray(had.sum(axis=0)).ravel()
    global_top = np.argsort(-buyers, kind="stable")[:10]
    x = build_matrix(pairs, len(users), len(items), value="n_events")
    w, ht, _ = hals(x, k, 7, 30)
    target = test.assign(user_idx=u_of.get_indexer(test.household_id), item_idx=i_of.get_indexer(test.product_id))
    target = target[target.user_idx >= 0].groupby("user_idx").item_idx.agg(lambda v: set(v[v >= 0]))
    discounts = 1.0 / np.log2(np.arange(2, 12))

    def scores(top, wanted):
        gains = np.array([1.0 if item in wanted else 0.0 for item in top])
        ideal = discounts[:min(len(wanted), 10)].sum()
        return (gains @ discounts / ideal if ideal > 0 else 0.0), float(gains.any())

    rows = []
    for rule in ("dominant", "relative"):
        seg, _ = assign(w, ht, rule)
        for l in range(k):
            members = np.flatnonzero(seg == l)
            seg_top = np.argsort(-np.asarray(had[members].sum(axis=0)).ravel(), kind="stable")[:10]
            evaluated = [u for u in members if u in target.index and target[u]]
            if not evaluated:
                continue
            both = np.array([scores(seg_top, target[u]) + scores(global_top, target[u]) for u in evaluated])
            diff = both[:, 0] - both[:, 2]
            se = lambda v: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
            rows.append({"rule": rule, "segment": l, "households": len(members), "evaluated": len(evaluated),
                         "ndcg10 segment": both[:, 0].mean(), "ndcg10 global": both[:, 2].mean(),
                         "ndcg diff": diff.mean(), "diff se": se(diff),
                         "hit10 segment": both[:, 1].mean(), "hit10 global": both[:, 3].mean()})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("warehouse")
    parser.add_argument("--part", default="all")
    parser.add_argument("--transactions", default="", help="the grocer's transactions.csv.gz (part nextbuy)")
    parser.add_argument("--test_weeks", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    inter = DeltaTable(f"{args.warehouse}/interactions").to_pandas(
        columns=["user_idx", "item_idx", "score", "n_events", "last_ts"])
    n_users, n_items = int(inter.user_idx.max()) + 1, int(inter.item_idx.max()) + 1
    had = sp.csr_matrix((np.ones(len(inter)), (inter.user_idx, inter.item_idx)), shape=(n_users, n_items))
    pd.set_option("display.width", 250)
    if args.part in ("all", "decay"):
        age = (inter.last_ts.max() - inter.last_ts).dt.days
        rows = []
        for days in (30, 60, 90, 180):
            recent = age <= days
            rows.append({"last days": days, "share of pairs": float(recent.mean()),
                         "share of sum log1p(score)": float(np.log1p(inter.score[recent]).sum() / np.log1p(inter.score).sum()),
                         "share of sum log1p(n_events)": float(np.log1p(inter.n_events[recent]).sum() / np.log1p(inter.n_events).sum())})
        log.info("pairs last bought in the last d days and their part of the matrix\n%s",
                 pd.DataFrame(rows).round(3).to_string(index=False))
    if args.part in ("all", "spectrum"):
        from scipy.sparse.linalg import svds
        rows = []
        for value in ("score", "n_events"):
            for cap in (1.0, 0.05):
                x = build_matrix(inter, n_users, n_items, value=value, cap=cap)
                s = np.sort(svds(x, k=40, random_state=0)[1])[::-1]
                norm_sq = float(x.multiply(x).sum())
                rows.append({"value": value, "cap": cap, **{f"k={k}": float(np.sum(s[:k] ** 2) / norm_sq)
                                                            for k in (1, 2, 5, 10, 20, 40)}})
        log.info("share of ||X||^2 the best rank-k approximation explains (SVD bound)\n%s",
                 pd.DataFrame(rows).round(3).to_string(index=False))
    if args.part in ("all", "variants"):
        rows = []
        variants = [dict(value="score", cap=0.05), dict(value="score", cap=1.0), dict(value="score", cap=0.05, idf=True),
                    dict(value="score", cap=0.05, row_normalize=False), dict(value="score", cap=0.05, transform="none"),
                    dict(value="n_events", cap=0.05), dict(value="n_events", cap=1.0), dict(value="binary", cap=0.05)]
        for variant in variants:
            x = build_matrix(inter, n_users, n_items, **variant)
            for iters in (7, 100):
                row, _ = evaluate(x, had, 5, iters)
                rows.append({**variant, **row})
                log.info("%s", rows[-1])
        log.info("k = 5 variants\n%s", pd.DataFrame(rows).round(3).to_string(index=False))
    if args.part in ("all", "sketch"):
        rows = []
        x = build_matrix(inter, n_users, n_items, value="n_events")
        for power in (0, 2, 4, 7):
            runs = [hals(x, 5, s, 100, power=power) for s in (7, 8)]
            for rule in ("dominant", "relative"):
                row, _ = evaluate(x, had, 5, 100, rule=rule, runs=runs)
                rows.append({"power iterations": power, "rule": rule,
                             "rel_err seed 8": runs[1][2][-1], **row})
                log.info("%s", rows[-1])
        log.info("sketch power iterations (n_events, cap 0.05, k = 5, 100 iterations)\n%s",
                 pd.DataFrame(rows).round(4).to_string(index=False))
    if args.part == "lift_ranking":
        # Could listing items by lift instead of weight give every segment a top-item lift >= 2?
        x = build_matrix(inter, n_users, n_items, value="n_events")
        w, ht, _ = hals(x, 5, 7, 30)
        seg, _ = assign(w, ht, "relative")
        rate = np.asarray(had.mean(axis=0)).ravel()
        for support in (0.05, 0.1, 0.2):
            rows = []
            for l in range(5):
                within = np.asarray(had[seg == l].mean(axis=0)).ravel()
                lift = np.where(rate > 0, within / np.maximum(rate, 1e-12), 0.0)
                candidates = np.flatnonzero(within >= support)
                top = candidates[np.argsort(-lift[candidates], kind="stable")[:10]]
                rows.append({"segment": l, "households": int((seg == l).sum()),
                             "mean lift of top 10 by lift": float(lift[top].mean()),
                             "their mean support": float(within[top].mean())})
            log.info("items bought by >= %.0f%% of the segment, ranked by lift\n%s", 100 * support,
                     pd.DataFrame(rows).round(2).to_string(index=False))
    if args.part == "nextbuy":
        log.info("segment-popular against global-popular on the last %d weeks\n%s", args.test_weeks,
                 next_purchase_table(args.transactions, args.test_weeks).round(4).to_string(index=False))
    if args.part in ("all", "assignment"):
        rows = []
        for value in ("score", "n_events"):
            x = build_matrix(inter, n_users, n_items, value=value)
            for k in (5, 8):
                runs = [hals(x, k, s, 100) for s in (7, 8)]
                early = hals(x, k, 7, fired_at(runs[0][2], 1e-4))
                for rule in ("dominant", "relative"):
                    row, _ = evaluate(x, had, k, 100, rule=rule, runs=runs)
                    row["ari_vs_stopped_early"] = ari(assign(early[0], early[1], rule)[0], assign(*runs[0][:2], rule)[0])
                    rows.append({"value": value, "rule": rule, **row})
                    log.info("%s", rows[-1])
        log.info("assignment rules (cap 0.05, log1p, rows normalized)\n%s",
                 pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
