"""A small markdown report of the customer segments with two PNGs (segment sizes, convergence).

Takes only what is already small on the driver: one row per segment, one row per iteration, one
row per k of the sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402


def write_segment_report(
    directory: str | Path,
    run_id: str,
    profiles: list[dict[str, Any]],
    history: list[tuple[int, float, float]],
    sweep: list[dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
    quality: Any | None = None,
) -> Path:
    """Write segments.md, segment_sizes.png and convergence.png into ``directory``; return the markdown path.

    ``profiles``: dicts with segment_id, size, share, label, top_items (list of (item_id, weight)).
    ``history``: (iteration, relative error, seconds). ``sweep``: per k tried, k, rel_error and iterations
    (with segments.choose_k also largest_share, size_entropy, stability_ari, empty_segments, chosen).
    ``quality``: a ``lib.segments.profiles.SegmentQuality`` (adds segment_quality.png and its section); profiles may
    then carry ``lifts`` (per top item), ``distinctive`` ((item_id, lift, support) by lift) and ``distinct``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    profiles = sorted(profiles, key=lambda p: p["segment_id"])

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([str(p["segment_id"]) for p in profiles], [p["size"] for p in profiles], color="#4477aa")
    ax.set_xlabel("segment")
    ax.set_ylabel("customers")
    ax.set_title("Customers per segment")
    fig.tight_layout()
    fig.savefig(out / "segment_sizes.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([h[0] for h in history], [h[1] for h in history], marker=".", color="#aa3377")
    ax.set_xlabel("iteration")
    ax.set_ylabel("||X - WH|| / ||X||")
    ax.set_title("NMF convergence")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=100)
    plt.close(fig)

    if quality is not None:
        _quality_plot(out / "segment_quality.png", profiles, quality)

    final = history[-1] if history else (0, float("nan"), 0.0)
    lines = [
        f"# Customer segments (run {run_id})",
        "",
        f"{len(profiles)} segments from a rank-{len(profiles)} NMF of the user x item interaction scores; "
        f"final relative error {final[1]:.4f} after {final[0]} iterations "
        f"({sum(h[2] for h in history):.1f} s).",
        "",
        "A customer belongs to the segment that explains most of their activity; *share* is the part "
        "of assigned customers in the segment. Top items are the items weighing most in the segment; "
        "distinctive items are those its customers have most often compared with everyone (lift: how many "
        "times more often; support: the share of the segment's customers who have it). A segment whose "
        "distinctive items barely stand out is labelled *General*: its customers share no taste to mail.",
        "",
        "![segment sizes](segment_sizes.png)",
        "",
        "| segment | customers | share | label | distinctive items (lift, support) | top items (weight) |",
        "|---:|---:|---:|---|---|---|",
    ]
    for p in profiles:
        items = ", ".join(f"{item} ({weight:.3f})" for item, weight in (p.get("top_items") or [])[:10])
        distinctive = ", ".join(f"{item} ({lift:.1f}x, {support:.0%})"
                                for item, lift, support in (p.get("distinctive") or [])[:5])
        lines.append(f"| {p['segment_id']} | {p['size']} | {p['share']:.1%} | {p['label']} | {distinctive} | {items} |")
    if quality is not None:
        lines += ["", "## Are the segments usable?", "", _quality_text(quality), "",
                  "![segment quality](segment_quality.png)", "",
                  "| figure | value | reads well when |", "|---|---:|---|",
                  f"| largest segment share | {quality.largest_share:.1%} | near 1/k = {1 / quality.k:.1%}; "
                  "far above it, one segment is 'everyone' |",
                  f"| size entropy (normalised) | {quality.size_entropy:.3f} | near 1 (equal sizes); 0 = one segment |",
                  f"| stability (ARI, seed vs seed + 1) | {_fmt(quality.stability_ari, '.3f')} | near 1: the same "
                  "customers group together from another start |",
                  f"| top-item lift, min / median over segments | {quality.min_top_lift:.2f} / "
                  f"{quality.median_top_lift:.2f} | well above 1: a segment's top items are its own, not "
                  "everyone's best sellers |",
                  f"| distinctive-item lift, min over segments | {_fmt(quality.min_distinct_lift, '.2f')} | at least "
                  "segments.min_distinct_lift: below it a segment is General |",
                  f"| customers in distinct (not General) segments | {_fmt(quality.distinct_share, '.1%')} | most of them |",
                  f"| segments without customers (merged under segments.min_segment_size, or nobody's best) | {quality.empty_segments} | 0 |",
                  f"| customers assigned | {quality.assigned_share:.1%} | near 100% |",
                  f"| items left out (products.exclude_item_patterns and exclude_categories, catalog flags) | {quality.excluded_items} | the non-product lines and unrecommendable products |",
                  f"| items damped (more than segments.popular_share_cap of users have them) | "
                  f"{quality.capped_items} | a handful of best sellers |",
                  ""]
    lines += ["", "## Convergence", "", "![convergence](convergence.png)", ""]
    if sweep and sweep[0].get("chosen") is not None:
        lines += ["## Choosing the number of segments", "",
                  "Each candidate k fitted from two seeds (segments.choose_k); the chosen k is the largest whose "
                  "segments are stable (ARI >= 0.8), balanced (entropy >= 0.8, largest share <= 2 / k) and all "
                  "kept (none merged), else the most stable:", "",
                  "| k | relative error | iterations | largest share | size entropy | stability ARI | merged | chosen |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {row['k']} | {row['rel_error']:.4f} | {row['iterations']} | {row['largest_share']:.1%} | "
                  f"{row['size_entropy']:.3f} | {row['stability_ari']:.3f} | {row['empty_segments']} | "
                  f"{'**chosen**' if row['chosen'] else ''} |" for row in sweep]
        lines.append("")
    elif sweep:
        lines += ["## Choosing the number of segments", "",
                  "Final relative error for each k tried (lower is a closer fit; look for where it stops "
                  "dropping much):", "", "| k | relative error | iterations |", "|---:|---:|---:|"]
        lines += [f"| {row['k']} | {row['rel_error']:.4f} | {row['iterations']} |" for row in sweep]
        lines.append("")
    if settings:
        lines += ["## Settings", ""] + [f"- `{key}` = `{value}`" for key, value in sorted(settings.items())] + [""]
    path = out / "segments.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(value: float, spec: str) -> str:
    return "not measured" if value != value else format(value, spec)


def _quality_text(quality: Any) -> str:
    verdicts = []
    if quality.largest_share > max(0.5, 2.0 / quality.k):
        verdicts.append(f"one segment holds {quality.largest_share:.0%} of the customers: it is a catch-all, "
                        "not a segment")
    if quality.min_top_lift < 1.5:
        verdicts.append(f"a segment's top items are bought only {quality.min_top_lift:.1f}x as often by its "
                        "customers as by everyone: it is led by generally popular items")
    if quality.stability_ari == quality.stability_ari and quality.stability_ari < 0.8:
        verdicts.append(f"another seed regroups the customers (ARI {quality.stability_ari:.2f}): the segments "
                        "are not stable")
    general = ""
    if quality.distinct_share == quality.distinct_share and quality.distinct_share < 1.0:
        general = (f" {1.0 - quality.distinct_share:.0%} of the customers are in General segments: nothing they "
                   "buy sets them apart, so mail them popular or buy-again lists rather than a taste.")
    if not verdicts and general:
        return "Balanced and stable: no segment is a catch-all, and another seed finds the same groups." + general
    if not verdicts:
        return ("Balanced, stable and distinct: no segment is a catch-all, each is led by items its customers "
                "buy more than others do, and another seed finds the same groups.")
    return "Warning: " + "; ".join(verdicts) + "." + general


def _quality_plot(path: Path, profiles: list[dict[str, Any]], quality: Any) -> None:
    names = [str(p["segment_id"]) for p in profiles]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [p["share"] for p in profiles], color="#4477aa")
    left.axhline(1.0 / quality.k, color="#888888", linestyle="--", label="1/k (equal sizes)")
    left.set_xlabel("segment")
    left.set_ylabel("share of customers")
    left.set_title(f"Sizes (entropy {quality.size_entropy:.2f})")
    left.legend(fontsize=8)
    width = 0.4
    positions = np.arange(len(names))
    right.bar(positions - width / 2, np.nan_to_num(quality.top_lifts), width, color="#228833", label="top items")
    if quality.distinct_lifts:
        right.bar(positions + width / 2, np.nan_to_num(quality.distinct_lifts), width, color="#ccbb44",
                  label="distinctive items")
    right.set_xticks(positions, names)
    right.axhline(1.0, color="#888888", linestyle="--", label="no lift (global rate)")
    right.set_xlabel("segment")
    right.set_ylabel("mean lift")
    right.set_title(f"Distinctness (stability ARI {_fmt(quality.stability_ari, '.2f')})")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
