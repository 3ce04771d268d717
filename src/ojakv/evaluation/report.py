"""Summaries of a sweep: ``summary.csv``, a markdown table, and plots of quality against held bytes, each cell
with its 95% interval and paired comparisons that say which differences are inside the noise."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ..layout import describe, merge_terms
from .stats import NOISE_P, mean_interval, sign_test, wilson

COLUMNS = ["method", "budget", "task", "length", "placement", "n", "accuracy", "ci_low", "ci_high", "held_ratio",
           "vs_full", "vs_full_p", "vs_best", "vs_best_p", "layout", "note"]
BUDGET_TOLERANCE = 0.02
GROUP = ("method", "budget", "task", "length", "placement")


def _records(samples_path: Path) -> list[dict]:
    records = []
    for line in samples_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summarise(samples_path: Path) -> list[dict]:
    """One row per (method, budget, task, length, placement): mean score with its 95% interval, mean measured
    held ratio, the layout the caches resolved to (numbers averaged over the samples), and paired comparisons with
    the full cache and with the best method at the same budget.

    ``accuracy`` is the mean string-match score (Wilson interval), or the perplexity for the ``ppl`` task (normal
    interval of the mean; lower is better). ``vs_full`` / ``vs_best`` are differences in accuracy, with the exact
    sign test's p-value over the samples both ran (``ojakv.evaluation.stats``). A row whose measured ratio
    misses the budget asked by more than 0.02 says so in ``note``.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in _records(samples_path):
        groups[tuple(record[k] for k in GROUP)].append(record)
    rows = [_row(key, records) for key, records in sorted(groups.items(), key=_sort_key)]
    _compare(rows)
    for row in rows:
        row.pop("_scores")
    return rows


def _row(key: tuple, records: list[dict]) -> dict:
    method, budget, task, length, placement = key
    row = {"method": method, "budget": "" if budget is None else budget, "task": task, "length": length,
           "placement": placement, "n": 0, "accuracy": "", "ci_low": "", "ci_high": "", "held_ratio": "",
           "vs_full": "", "vs_full_p": "", "vs_best": "", "vs_best_p": "", "layout": "", "note": "", "_scores": {}}
    measured = [r for r in records if "unreachable" not in r]
    if not measured:
        row["note"] = records[0]["unreachable"]
        return row
    scores = [r["score"] for r in measured]
    accuracy = mean(scores)
    low, high = mean_interval(scores) if task == "ppl" else wilson(accuracy, len(scores))
    ratio = mean(r["held_ratio"] for r in measured)
    if budget is not None and abs(ratio - budget) > BUDGET_TOLERANCE:
        row["note"] = f"held {ratio:.3f} misses budget {budget} (the method cannot reach it with its knobs)"
    row.update(n=len(scores), accuracy=round(accuracy, 4), ci_low=round(low, 4), ci_high=round(high, 4),
               held_ratio=round(ratio, 4), layout=describe(merge_terms([r.get("layout", {}) for r in measured])),
               _scores={(r["index"], r.get("query", 0)): r["score"] for r in measured})
    return row


def _compare(rows: list[dict]) -> None:
    """Fill ``vs_full`` and ``vs_best`` with paired differences and their sign-test p-values."""
    for row in rows:
        if not row["n"]:
            continue
        same_task = [r for r in rows if r["n"] and (r["task"], r["length"], r["placement"]) ==
                     (row["task"], row["length"], row["placement"])]
        full = next((r for r in same_task if r["method"] == "full"), None)
        if full is not None and row is not full:
            row["vs_full"], row["vs_full_p"] = _paired(row, full)
        peers = [r for r in same_task if r["budget"] == row["budget"] and r["method"] != "full"]
        if row["method"] != "full" and peers:
            better = (lambda r: -r["accuracy"]) if row["task"] == "ppl" else (lambda r: r["accuracy"])
            best = max(peers, key=better)
            row["vs_best"], row["vs_best_p"] = (0.0, 1.0) if best is row else _paired(row, best)


def _paired(row: dict, other: dict) -> tuple[float, float]:
    shared = sorted(set(row["_scores"]) & set(other["_scores"]))
    a, b = [row["_scores"][k] for k in shared], [other["_scores"][k] for k in shared]
    if row["task"] == "ppl":  # lower perplexity is better: compare negated values
        a, b = [-x for x in a], [-x for x in b]
    difference = round(mean(row["_scores"][k] - other["_scores"][k] for k in shared), 4) if shared else ""
    return difference, round(sign_test(a, b), 4) if shared else ""


def _sort_key(item):
    (method, budget, task, length, placement), _ = item
    return (task, length, placement, method != "full", method, -(budget or 1.0))


def write_reports(out_dir: Path) -> list[dict]:
    rows = summarise(out_dir / "samples.jsonl")
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.md").write_text(headline_table(rows) + "\n" + markdown_table(rows))
    _plot(rows, out_dir)
    _plot_needle_grid(out_dir / "samples.jsonl", out_dir)
    return rows


SOLVED = 0.8  # a task counts in the headline where the full cache scores at least this


def headline_table(rows: list[dict]) -> str:
    """Mean accuracy per method and budget over the tasks the full cache solves (>= 0.8 at that length and
    placement), with the tasks it does not solve named apart: a model's failures are not compression damage."""
    lines = []
    for length, placement in sorted({(r["length"], r["placement"]) for r in rows if r["task"] != "ppl"}):
        here = [r for r in rows if (r["length"], r["placement"]) == (length, placement) and r["task"] != "ppl"]
        full = {r["task"]: r["accuracy"] for r in here if r["method"] == "full" and r["n"]}
        solved = sorted(task for task, accuracy in full.items() if accuracy >= SOLVED)
        apart = sorted(set(full) - set(solved))
        lines.append(f"**Headline, {length} tokens, question {placement}**: mean accuracy over the tasks the full "
                     f"cache solves ({', '.join(solved) or 'none'}); not solved by the full cache, so left out: "
                     f"{', '.join(f'{t} ({full[t]:.2f})' for t in apart) or 'none'}.\n")
        lines += ["| method | budget | mean accuracy | held | samples |", "|---|---|---|---|---|"]
        cells = sorted({(r["method"], r["budget"]) for r in here}, key=lambda c: (c[0] != "full", c[0], -(c[1] or 1)))
        for method, budget in cells:
            mine = [r for r in here if (r["method"], r["budget"]) == (method, budget) and r["task"] in solved]
            if not solved or len(mine) < len(solved) or not all(r["n"] for r in mine):
                continue  # unreachable or incomplete on some solved task
            accuracy = mean(r["accuracy"] for r in mine)
            held = mean(r["held_ratio"] for r in mine)
            lines.append(f"| {method} | {budget} | {accuracy:.3f} | {held:.3f} | {sum(r['n'] for r in mine)} |")
        lines.append("")
    return "\n".join(lines)


def _versus(difference, p, best: bool = False) -> str:
    """A comparison cell: the difference, or ≈ when it is inside the noise of the sample size."""
    if difference == "":
        return ""
    if best and difference == 0.0 and p == 1.0:
        return "best"
    if p >= NOISE_P:
        return f"≈ ({difference:+.2f}, p={p:.2f})"
    return f"{difference:+.2f} (p={p:.3f})"


def markdown_table(rows: list[dict]) -> str:
    """The summary for reading: accuracy with its 95% interval; against the full cache and the best method at the
    same budget, a difference inside the noise (paired sign test, p >= 0.05) is shown as ≈."""
    header = ["method", "budget", "task", "length", "placement", "n", "accuracy [95% CI]", "held", "vs full",
              "vs best at budget", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        accuracy = f"{row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if row["n"] else ""
        cells = [row["method"], row["budget"], row["task"], row["length"], row["placement"], row["n"], accuracy,
                 row["held_ratio"], _versus(row["vs_full"], row["vs_full_p"]),
                 _versus(row["vs_best"], row["vs_best_p"], best=True), row["note"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], out_dir: Path) -> None:
    """Accuracy (or perplexity) against measured held ratio with 95% intervals, one panel per task and placement."""
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
            points = sorted((r["held_ratio"], r["accuracy"], r["ci_low"], r["ci_high"]) for r in subset
                            if r["method"] == method)
            x, y = [p[0] for p in points], [p[1] for p in points]
            errors = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]  # the 95% interval
            ax.errorbar(x, y, yerr=errors, marker=markers[i % len(markers)], color=colours[i % len(colours)],
                        alpha=0.85, capsize=2, linewidth=1, elinewidth=0.8, label=method)
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
