"""Summaries of a sweep: ``summary.csv``, a markdown table, and plots of quality against held bytes."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

COLUMNS = ["method", "budget", "task", "length", "placement", "n", "accuracy", "held_ratio", "note"]
BUDGET_TOLERANCE = 0.02


def summarise(samples_path: Path) -> list[dict]:
    """One row per (method, budget, task, length, placement): mean score and mean measured held ratio.

    ``accuracy`` is the mean string-match score, or the perplexity for the ``ppl`` task. A row whose measured
    ratio misses the budget asked by more than 0.02 says so in ``note``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in samples_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        groups[tuple(record[k] for k in ("method", "budget", "task", "length", "placement"))].append(record)
    rows = []
    for (method, budget, task, length, placement), records in sorted(groups.items(), key=_sort_key):
        measured = [r for r in records if "unreachable" not in r]
        if not measured:
            rows.append({"method": method, "budget": budget, "task": task, "length": length, "placement": placement,
                         "n": 0, "accuracy": "", "held_ratio": "", "note": records[0]["unreachable"]})
            continue
        records = measured
        ratio = mean(r["held_ratio"] for r in records)
        note = ""
        if budget is not None and abs(ratio - budget) > BUDGET_TOLERANCE:
            note = f"held {ratio:.3f} misses budget {budget} (the method cannot reach it with its knobs)"
        rows.append({"method": method, "budget": "" if budget is None else budget, "task": task,
                     "length": length, "placement": placement, "n": len(records),
                     "accuracy": round(mean(r["score"] for r in records), 4), "held_ratio": round(ratio, 4),
                     "note": note})
    return rows


def _sort_key(item):
    (method, budget, task, length, placement), _ = item
    return (task, length, placement, method != "full", method, -(budget or 1.0))


def write_reports(out_dir: Path) -> list[dict]:
    rows = summarise(out_dir / "samples.jsonl")
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.md").write_text(markdown_table(rows))
    _plot(rows, out_dir)
    _plot_needle_grid(out_dir / "samples.jsonl", out_dir)
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return header + "".join("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |\n" for row in rows)


def _plot(rows: list[dict], out_dir: Path) -> None:
    """Accuracy (or perplexity) against measured held ratio, one panel per task and placement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional; the CSV and markdown always exist
        return
    panels = sorted({(r["task"], r["placement"], r["length"]) for r in rows})
    markers = "os^vDP*Xph<>"
    for task, placement, length in panels:
        subset = [r for r in rows if (r["task"], r["placement"], r["length"]) == (task, placement, length)
                  and r["n"]]  # an unreachable budget has no point
        methods = sorted({r["method"] for r in subset})
        # Many methods: 20 colours times distinct markers, the legend beside the axes so it hides no point.
        fig, ax = plt.subplots(figsize=(5 + (2 if len(methods) > 6 else 0), 3.5))
        colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
        for i, method in enumerate(methods):
            points = sorted((r["held_ratio"], r["accuracy"]) for r in subset if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                    color=colours[i % len(colours)], alpha=0.85, label=method)
        ax.set_xlabel("held bytes / full-cache bytes")
        ax.set_ylabel("perplexity" if task == "ppl" else "accuracy")
        ax.set_title(f"{task}, {length} tokens, question {placement}", fontsize=9)
        ax.grid(alpha=0.3)
        if len(methods) > 6:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        else:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{task}_{length}_{placement}.png", dpi=110)
        plt.close(fig)


def _plot_needle_grid(samples_path: Path, out_dir: Path) -> None:
    """For the ``needle`` task: accuracy by context length (columns) and needle depth (rows), one map per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in samples_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("task") == "needle":
            run = (record["method"], record["budget"], record["placement"])
            cells[run][(record["meta"]["depths"][0], record["length"])].append(record["score"])
    for (method, budget, placement), grid in cells.items():
        depths = sorted({d for d, _ in grid})
        lengths = sorted({n for _, n in grid})
        image = [[mean(grid[(d, n)]) if (d, n) in grid else float("nan") for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 4))
        shown = ax.imshow(image, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{method}" + (f" @ {budget}" if budget is not None else "") + f", question {placement}",
                     fontsize=8)
        fig.colorbar(shown, ax=ax, fraction=0.05)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
        fig.savefig(out_dir / f"needle_grid_{safe}_{budget}_{placement}.png", dpi=110)
        plt.close(fig)
