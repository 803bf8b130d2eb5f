"""`lenvm-rl length-tokens`: which tokens move the LenVM's length estimate (the paper's §4.6).

For every finished rollout the LenVM scores V(s_0) .. V(s_L) (V(s_L) := 0, the terminal state), and each
completion token y_t (the action taken in s_t, t < L) gets its TD residual
s_t = -(1 - γ) + γ V(s_{t+1}) - V(s_t) (``returns.td_residuals``). A residual above +threshold means the
token made the rest of the completion shorter than the LenVM expected before it; below -threshold,
longer. Per distinct token text: occurrences, passes above and below the threshold and their rates.
Writes ``length_tokens.json``, ``length_tokens.md`` (the top tokens each way, by pass count) and
``length_tokens.png`` (bar plots of the same).

A two-value LenVM (``segment_values``) gives each token the residual of its own segment's value
(``returns.segment_td_residuals``): a thinking token the thinking value's, an answer token the answer value's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenvm_rl.errors import ConfigError


@dataclass
class LengthTokenArguments:
    lenvm_model_path: str = field(default="runs/lenvm", metadata={"help": "Output folder of `lenvm-rl train-lenvm`."})
    rollouts_path: str = field(default="runs/rollouts_eval", metadata={"help": "Rollouts to analyse (finished ones)."})
    threshold: float = field(default=0.02, metadata={"help": "|s_t| above this counts as a pass (value units)."})
    min_count: int = field(default=5, metadata={"help": "Ignore tokens seen fewer times than this."})
    top: int = field(default=15, metadata={"help": "Tokens listed each way."})
    batch_size: int = field(default=8, metadata={"help": "Rollouts scored per forward pass."})
    output_dir: str = field(default="runs/length_tokens", metadata={"help": "Where the JSON, table and plot go."})

    def __post_init__(self):
        if self.threshold <= 0:
            raise ConfigError(f"threshold: must be positive (value units, e.g. 0.02), got {self.threshold}")
        if self.min_count < 1 or self.top < 1:
            raise ConfigError(f"min_count / top: must be >= 1, got {self.min_count} / {self.top}")


def token_residual_stats(
    values: list[torch.Tensor], rows, tokenizer, gamma: float, threshold: float, two_values: bool = False
) -> dict[str, dict]:
    """Per token text: count, up (s_t > threshold), down (s_t < -threshold), mean residual.

    ``values[i]`` holds V(s_0) .. V(s_L) of the finished rollout ``rows[i]``, (L + 1,), or (L + 1, 2) for a two-value
    LenVM, whose rows carry ``thinking_tokens``.
    """
    from lenvm_rl.returns import segment_td_residuals, td_residuals

    stats: dict[str, dict] = defaultdict(lambda: {"count": 0, "up": 0, "down": 0, "sum": 0.0})
    for value, row in zip(values, rows):
        length = row["completion_tokens"]
        trace = value[: length + 1].double().clone()
        trace[length] = 0.0  # terminal
        valid = torch.ones(1, length, dtype=torch.bool)
        if two_values:  # each token's residual of its own segment's value
            thinking = torch.tensor([row["thinking_tokens"]])
            both = segment_td_residuals(trace[None], valid, thinking, gamma)[0]  # (L, 2)
            residuals = torch.where(torch.arange(length) < thinking, both[:, 0], both[:, 1])
        else:
            residuals = td_residuals(trace[None], valid, gamma)[0]  # (L,)
        for token_id, residual in zip(row["completion_ids"], residuals.tolist()):
            entry = stats[tokenizer.decode([token_id])]
            entry["count"] += 1
            entry["up"] += residual > threshold
            entry["down"] += residual < -threshold
            entry["sum"] += residual
    return {
        text: {
            "count": e["count"],
            "up": e["up"],
            "down": e["down"],
            "up_rate": e["up"] / e["count"],
            "down_rate": e["down"] / e["count"],
            "mean_residual": e["sum"] / e["count"],
        }
        for text, e in stats.items()
    }


def shown(text: str, escape_bars: bool = False) -> str:
    """A token's text with whitespace and newlines visible (JSON escapes), for tables and tick labels."""
    text = json.dumps(text, ensure_ascii=False)[1:-1].replace(" ", "␣")
    return text.replace("|", "\\|") if escape_bars else text


def ranked(stats: dict[str, dict], direction: str, min_count: int, top: int) -> list[tuple[str, dict]]:
    """The ``top`` tokens with the most passes in ``direction`` (up or down), ties by rate."""
    eligible = [(text, s) for text, s in stats.items() if s["count"] >= min_count and s[direction] > 0]
    return sorted(eligible, key=lambda item: (-item[1][direction], -item[1][f"{direction}_rate"]))[:top]


def main(argv: list[str] | None = None) -> dict:
    from lenvm_rl.critic_metrics import check_lenvm_reads_rollouts, require_segments, score_rollouts
    from lenvm_rl.loading import inference_device, load_tokenizer
    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.outputs import check_output_dir, claim_output_dir
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.rollout_data import load_rollouts

    (args,) = parse_recipe((LengthTokenArguments,), argv)
    check_output_dir(args.output_dir, {"lenvm_model_path": args.lenvm_model_path, "rollouts_path": args.rollouts_path})
    claim_output_dir(args.output_dir)
    model = load_lenvm(args.lenvm_model_path, two_values=True).to(inference_device())
    tokenizer = load_tokenizer(args.lenvm_model_path)
    rows = load_rollouts(args.rollouts_path)
    check_lenvm_reads_rollouts(args.lenvm_model_path, model, rows, args.rollouts_path)
    rows = rows.filter(lambda f: f, input_columns="finished")
    if len(rows) == 0:
        raise ConfigError(f"rollouts_path: {args.rollouts_path} has no finished rollout to analyse")
    if model.config.segment_values:
        require_segments(rows, "rollouts_path")
    gamma = model.config.gamma
    values = score_rollouts(model, rows, tokenizer.pad_token_id, args.batch_size)
    stats = token_residual_stats(values, rows, tokenizer, gamma, args.threshold, model.config.segment_values)
    lists = {direction: ranked(stats, direction, args.min_count, args.top) for direction in ("up", "down")}

    lines = [f"TD residuals of {len(rows)} finished rollouts, γ = {gamma:.4f}, threshold ±{args.threshold}", ""]
    for direction, meaning in (
        ("up", "shorten the rest (s_t > +threshold)"),
        ("down", "lengthen the rest (s_t < -threshold)"),
    ):
        lines += [
            f"Tokens that most often {meaning}:",
            "",
            "| token | seen | passes | rate | mean s_t |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {shown(text, escape_bars=True)} | {s['count']} | {s[direction]} | {s[direction + '_rate']:.2f} | "
            f"{s['mean_residual']:+.4f} |"
            for text, s in lists[direction]
        ]
        lines.append("")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines)
    (output_dir / "length_tokens.md").write_text(table)
    result = {"gamma": gamma, "threshold": args.threshold, "tokens": stats}
    (output_dir / "length_tokens.json").write_text(json.dumps(result, indent=2))
    plot(lists, output_dir / "length_tokens.png")
    print(table)
    print(f"wrote {output_dir}/length_tokens.json, length_tokens.md, length_tokens.png")
    return result


def plot(lists: dict[str, list[tuple[str, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, (direction, title) in zip(
        axes, (("up", "shortening tokens (s_t > +thr)"), ("down", "lengthening tokens (s_t < -thr)"))
    ):
        items = lists[direction]
        axis.bar(
            range(len(items)), [s[direction] for _, s in items], color="tab:green" if direction == "up" else "tab:red"
        )
        axis.set_xticks(range(len(items)), [shown(text) for text, _ in items], rotation=60, ha="right", fontsize=8)
        axis.set(title=title, ylabel="passes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
