"""Scoring and reporting an evaluation: one record per generation, metrics per (kind, budget), the table and plots.

``evaluate`` writes a record per generation (``score_record``) to its generations files, summarises each arm's
records (``summarize``: accuracy, tokens, LIFEBench length deviation and score, hit rate, docs/DESIGN.md §3.5) and
writes ``results.md`` (``markdown_table``) and two plots (``plot_results``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lenvm_rl.data_parallel import parts_of
from rewards.scores import BUDGET_KINDS, budget_hit, budget_kind_codes, lifebench_length_score

METRICS = ("accuracy", "mean_tokens", "length_deviation", "abs_length_deviation", "length_score", "hit_rate")


def score_record(row: dict, text: str, tokens: int, finished: bool, hard_truncation: bool = False) -> dict:
    """One generation's record: budget, tokens, finished, correct (None without an answer column), text."""
    from rewards import is_correct

    correct = None
    if row.get("answer") is not None:
        correct = is_correct(text, row["answer"]) and (finished or not hard_truncation)
    return {
        "budget_tokens": row["budget_tokens"],
        "budget_kind": row["budget_kind"],
        "tokens": tokens,
        "finished": finished,
        "correct": correct,
        "completion": text,
    }


def read_records(path: Path) -> list[dict]:
    """The complete records of a generations file; a torn last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
        path.write_text("".join(lines))
    return [json.loads(line) for line in lines]


def summarize(records: list[dict]) -> list[dict]:
    """Per (kind, budget) metrics of the records, kinds in BUDGET_KINDS order, budgets ascending."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["budget_kind"], record["budget_tokens"]), []).append(record)
    summary = []
    for (kind, budget), group in sorted(groups.items(), key=lambda item: (BUDGET_KINDS.index(item[0][0]), item[0][1])):
        lengths = torch.tensor([float(r["tokens"]) for r in group])
        budgets = torch.full_like(lengths, float(budget))
        kinds = budget_kind_codes([kind] * len(group))
        deviation = (lengths - budgets) / budgets
        graded = [r["correct"] for r in group if r["correct"] is not None]
        summary.append(
            {
                "budget_kind": kind,
                "budget_tokens": budget,
                "n": len(group),
                "accuracy": sum(graded) / len(graded) if graded else None,
                "mean_tokens": lengths.mean().item(),
                "length_deviation": deviation.mean().item(),
                "abs_length_deviation": deviation.abs().mean().item(),
                "length_score": lifebench_length_score(lengths, budgets, kinds).mean().item(),
                "hit_rate": budget_hit(lengths, budgets, kinds).float().mean().item(),
                "finished_rate": sum(r["finished"] for r in group) / len(group),
            }
        )
    return summary


def ms_per_token(records: list[dict]) -> float:
    """Generation wall time per generated token (EOS included) over an arm's records, in milliseconds."""
    steps = sum(r["tokens"] + r["finished"] for r in records)
    return 1000 * sum(r.get("seconds", 0.0) for r in records) / max(steps, 1)


def markdown_table(
    results: dict[str, list[dict]], costs: dict[str, float] | None = None, backends: dict[str, str] | None = None
) -> str:
    """One row per (model, kind, budget) plus each model's mean over its budgets; then ms per token."""
    header = "| model | kind | budget | n | accuracy | mean tokens | length dev. | length score | hit rate |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    for label, summary in results.items():
        for s in [*summary, mean_row(summary)]:
            lines.append(
                f"| {label} | {s['budget_kind']} | {s['budget_tokens']} | {s['n']} | {cell(s['accuracy'], '.3f')} | "
                f"{s['mean_tokens']:.1f} | {s['length_deviation']:+.2f} | {s['length_score']:.3f} | {s['hit_rate']:.3f} |"
            )
    if costs:
        backends = backends or {}
        lines += ["", "| model | generation ms per token | generator |", "|---|---:|---|"]
        lines += [f"| {label} | {cost:.1f} | {backends.get(label, 'hf')} |" for label, cost in costs.items()]
    return "\n".join(lines) + "\n"


def mean_row(summary: list[dict]) -> dict:
    """Unweighted mean of the per-budget rows (each budget counts once)."""
    row = {"budget_kind": "all", "budget_tokens": "mean", "n": sum(s["n"] for s in summary)}
    for name in (*METRICS, "finished_rate"):
        values = [s[name] for s in summary if s[name] is not None]
        row[name] = sum(values) / len(values) if values else None
    return row


def plot_results(results: dict[str, list[dict]], output_dir: Path) -> list[Path]:
    """length_score.png (score against budget, a line per model and kind) and pareto.png (accuracy vs tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [output_dir / "length_score.png", output_dir / "pareto.png"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, summary in results.items():
        for kind in BUDGET_KINDS:
            points = [(s["budget_tokens"], s["length_score"]) for s in summary if s["budget_kind"] == kind]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{label} ({kind})")
    axis.set(xscale="log", xlabel="budget N (tokens)", ylabel="mean length score", ylim=(-0.02, 1.02))
    axis.set_title("Length score against budget")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, summary in results.items():
        points = [(s["mean_tokens"], s["accuracy"]) for s in summary if s["accuracy"] is not None]
        if points:
            axis.plot(*zip(*sorted(points)), marker="o", label=label)
            for s in summary:
                if s["accuracy"] is not None:
                    axis.annotate(
                        f"{s['budget_kind'][:5]} {s['budget_tokens']}", (s["mean_tokens"], s["accuracy"]), fontsize=7
                    )
    axis.set(xlabel="mean completion tokens", ylabel="accuracy", ylim=(-0.02, 1.02))
    axis.set_title("Accuracy against length")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=100)
    plt.close(figure)
    return paths


def drop_if_stale(file: Path, adapter: str | None) -> None:
    """Delete an arm's generations when its adapter's weights changed since they were written (a retrained run)."""
    fingerprint = None
    if adapter is not None:
        weights = sorted(Path(adapter).glob("adapter_model.*"))
        fingerprint = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    stamp = file.with_suffix(".adapter.json")
    if (file.exists() or parts_of(file)) and (not stamp.exists() or json.loads(stamp.read_text()) != fingerprint):
        print(f"{file}: the adapter {adapter} changed since these generations were written; generating them again")
        for written in [file, *parts_of(file)]:
            written.unlink(missing_ok=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint))
