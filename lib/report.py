"""A small markdown report of the customer segments with two PNGs (segment sizes, convergence).

Takes only what is already small on the driver: one row per segment, one row per iteration, one
row per k of the sweep.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # batch jobs have no display
import matplotlib.pyplot as plt  # noqa: E402


def write_segment_report(
    directory: str | Path,
    run_id: str,
    profiles: list[dict[str, Any]],
    history: list[tuple[int, float, float]],
    sweep: list[tuple[int, float, int]] | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Write segments.md, segment_sizes.png and convergence.png into ``directory``; return the markdown path.

    ``profiles``: dicts with segment_id, size, share, label, top_items (list of (item_id, weight)).
    ``history``: (iteration, relative error, seconds). ``sweep``: (k, final relative error, iterations).
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

    final = history[-1] if history else (0, float("nan"), 0.0)
    lines = [
        f"# Customer segments (run {run_id})",
        "",
        f"{len(profiles)} segments from a rank-{len(profiles)} NMF of the user x item interaction scores; "
        f"final relative error {final[1]:.4f} after {final[0]} iterations "
        f"({sum(h[2] for h in history):.1f} s).",
        "",
        "A customer belongs to the segment that explains most of their activity; *share* is the part "
        "of assigned customers in the segment. Top items are the items weighing most in the segment.",
        "",
        "![segment sizes](segment_sizes.png)",
        "",
        "| segment | customers | share | label | top items (weight) |",
        "|---:|---:|---:|---|---|",
    ]
    for p in profiles:
        items = ", ".join(f"{item} ({weight:.3f})" for item, weight in (p.get("top_items") or [])[:10])
        lines.append(f"| {p['segment_id']} | {p['size']} | {p['share']:.1%} | {p['label']} | {items} |")
    lines += ["", "## Convergence", "", "![convergence](convergence.png)", ""]
    if sweep:
        lines += ["## Choosing the number of segments", "",
                  "Final relative error for each k tried (lower is a closer fit; look for where it stops "
                  "dropping much):", "", "| k | relative error | iterations |", "|---:|---:|---:|"]
        lines += [f"| {k} | {err:.4f} | {its} |" for k, err, its in sweep]
        lines.append("")
    if settings:
        lines += ["## Settings", ""] + [f"- `{key}` = `{value}`" for key, value in sorted(settings.items())] + [""]
    path = out / "segments.md"
    path.write_text("\n".join(lines))
    return path
