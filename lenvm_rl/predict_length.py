"""`lenvm-rl predict-length`: the LenVM's prompt-boundary length prediction beside sampled lengths.

For each held-out prompt: L̂ = ln(1 + V(s_0))/ln γ against L_GT from its sampled completions (the
paper's §4.4), as a table and JSON with the MRE at the bottom; and the per-token value trace of one
completion (V_t and the predicted remaining tokens l̂_t against position t) as a PNG.

A two-value LenVM (``segment_values``) is read per segment: the thinking and the answer prediction of every prompt
against the segment lengths of its samples, the per-segment MREs (``critic_metrics.segment_length_metrics``), and one
trace per segment (``value_trace_thinking.png``, ``value_trace_answer.png``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class PredictArguments:
    lenvm_model_path: str = field(default="runs/lenvm", metadata={"help": "Output folder of `lenvm-rl train-lenvm`."})
    rollouts_path: str = field(default="runs/rollouts_eval", metadata={"help": "Held-out rollouts to compare against."})
    num_prompts: int | None = field(default=None, metadata={"help": "Show at most this many prompts."})
    output_dir: str = field(default="runs/predict", metadata={"help": "Where predictions.json and the PNG go."})
    batch_size: int = field(default=8, metadata={"help": "Rollouts scored per forward pass."})
    trace_index: int = field(default=0, metadata={"help": "Which finished rollout's value trace to plot."})


def plot_value_trace(values: torch.Tensor, remaining: torch.Tensor, gamma: float, path: Path, title: str) -> None:
    """V(s_t) and its predicted remaining tokens against the realised ``remaining`` tokens (T + 1,) at each t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lenvm_rl.returns import remaining_from_value

    positions = torch.arange(len(values))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(positions, values, label="V(s_t) predicted")
    top.plot(positions, -(1 - gamma ** remaining.double()), "--", label="G_t realised")
    top.set_ylabel("value")
    top.legend()
    bottom.plot(positions, remaining_from_value(values.double(), gamma), label="predicted remaining tokens")
    bottom.plot(positions, remaining, "--", label="true remaining tokens")
    bottom.set_xlabel("completion token t")
    bottom.set_ylabel("tokens")
    bottom.legend()
    figure.suptitle(f"{title} (L = {int(remaining[0])}, γ = {gamma:.4f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    from lenvm_rl.critic_metrics import (
        check_lenvm_reads_rollouts,
        lenvm_metrics,
        require_segments,
        score_rollouts,
    )
    from lenvm_rl.loading import inference_device, load_tokenizer
    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.outputs import check_output_dir, claim_output_dir
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.returns import prompt_boundary_ground_truth, remaining_from_value
    from lenvm_rl.rollout_data import load_rollouts

    (args,) = parse_recipe((PredictArguments,), argv)
    check_output_dir(args.output_dir, {"lenvm_model_path": args.lenvm_model_path, "rollouts_path": args.rollouts_path})
    claim_output_dir(args.output_dir)
    model = load_lenvm(args.lenvm_model_path, two_values=True).to(inference_device())
    two_values = model.config.segment_values
    tokenizer = load_tokenizer(args.lenvm_model_path)
    rows = load_rollouts(args.rollouts_path)
    check_lenvm_reads_rollouts(args.lenvm_model_path, model, rows, args.rollouts_path)
    if args.num_prompts is not None:
        keep = sorted(set(rows["prompt_id"]))[: args.num_prompts]
        rows = rows.filter(lambda p: p in set(keep), input_columns="prompt_id")
    rows = rows.filter(lambda f: f, input_columns="finished")
    if two_values:
        require_segments(rows, "rollouts_path")
    if len(rows) == 0:
        from lenvm_rl.errors import ConfigError

        raise ConfigError(f"rollouts_path: {args.rollouts_path} has no finished rollout to compare against")
    gamma = model.config.gamma
    values = score_rollouts(model, rows, tokenizer.pad_token_id, args.batch_size)

    # One prediction per value: (the key prefix, each row's tokens that value counts, the value at s_0 of a row).
    if two_values:
        heads = [
            ("thinking_", lambda row: row["thinking_tokens"], lambda v: v[0, 0]),
            ("answer_", lambda row: row["completion_tokens"] - row["thinking_tokens"], lambda v: v[0, 1]),
        ]
    else:
        heads = [("", lambda row: row["completion_tokens"], lambda v: v[0])]
    per_prompt: dict[int, dict] = {}
    for row, v in zip(rows, values):
        entry = per_prompt.setdefault(row["prompt_id"], {"prompt_id": row["prompt_id"]})
        for prefix, tokens, boundary in heads:
            entry[f"{prefix}value_s0"] = float(boundary(v))
            entry.setdefault(f"{prefix}lengths", []).append(tokens(row))
    for entry in per_prompt.values():
        for prefix, _, _ in heads:
            value = torch.tensor(entry[f"{prefix}value_s0"], dtype=torch.float64)
            entry[f"{prefix}predicted_tokens"] = float(remaining_from_value(value, gamma))
            lengths = torch.tensor(entry[f"{prefix}lengths"], dtype=torch.float64)
            entry[f"{prefix}ground_truth_tokens"] = float(prompt_boundary_ground_truth([lengths], gamma)[0])
    metrics = lenvm_metrics(model.config, rows, values)

    for prefix, _, _ in heads:
        print(f"{'prompt':>6}  {'predicted':>9}  {'L_GT':>7}  {'rel.err':>7}  sampled {prefix}lengths")
        for e in per_prompt.values():
            predicted, truth = e[f"{prefix}predicted_tokens"], e[f"{prefix}ground_truth_tokens"]
            rel = abs(predicted - truth) / max(truth, 1e-9)
            print(
                f"{e['prompt_id']:>6}  {predicted:>9.1f}  {truth:>7.1f}  {rel:>7.1%}  {sorted(e[f'{prefix}lengths'])}"
            )
        if f"{prefix}boundary_mre" in metrics:
            print(f"{prefix}prompt-boundary MRE: LenVM {metrics[f'{prefix}boundary_mre']:.3f}")
    config = model.config
    for name, constant, label in [
        ("constant_mre", config.train_length_mean, "mean training length"),
        ("constant_value_mre", config.train_boundary_tokens, "best constant in value space"),
    ]:
        if name in metrics:
            print(f"  constant predictor, {label} ({constant:.1f} tokens): {metrics[name]:.3f}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trace = args.trace_index % len(rows)
    length, steps = rows[trace]["completion_tokens"], torch.arange(rows[trace]["completion_tokens"] + 1)
    if two_values:
        thinking = rows[trace]["thinking_tokens"]
        traces = {
            "value_trace_thinking.png": (values[trace][:, 0], (thinking - steps).clamp(min=0), "thinking value"),
            "value_trace_answer.png": (values[trace][:, 1], length - steps.clamp(min=thinking), "answer value"),
        }
    else:
        traces = {"value_trace.png": (values[trace], length - steps, "LenVM value trace")}
    for name, (trace_values, remaining, title) in traces.items():
        plot_value_trace(trace_values, remaining, gamma, output_dir / name, title)
    result = {"gamma": gamma, "metrics": metrics, "prompts": list(per_prompt.values())}
    (output_dir / "predictions.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {output_dir / 'predictions.json'} and {', '.join(str(output_dir / name) for name in traces)}")
    return result
