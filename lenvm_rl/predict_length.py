"""`lenvm-rl predict-length`: the LenVM's prompt-boundary length prediction beside sampled lengths.

For each held-out prompt: L̂ = ln(1 + V(s_0))/ln γ against L_GT from its sampled completions (the
paper's §4.4), as a table and JSON with the MRE at the bottom; and the per-token value trace of one
completion (V_t and the predicted remaining tokens l̂_t against position t) as a PNG.
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


def plot_value_trace(values: torch.Tensor, length: int, gamma: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lenvm_rl.returns import remaining_from_value

    positions = torch.arange(len(values))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(positions, values, label="V(s_t) predicted")
    top.plot(positions, -(1 - gamma ** (length - positions.double())), "--", label="G_t realised")
    top.set_ylabel("value")
    top.legend()
    bottom.plot(positions, remaining_from_value(values.double(), gamma), label="predicted remaining tokens")
    bottom.plot(positions, length - positions, "--", label="true remaining tokens")
    bottom.set_xlabel("completion token t")
    bottom.set_ylabel("tokens")
    bottom.legend()
    figure.suptitle(f"LenVM value trace (L = {length}, γ = {gamma:.4f})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    from lenvm_rl.critic_metrics import check_lenvm_reads_rollouts, constant_baselines, length_metrics, score_rollouts
    from lenvm_rl.loading import inference_device, load_tokenizer
    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.outputs import check_output_dir, claim_output_dir
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.returns import prompt_boundary_ground_truth, remaining_from_value
    from lenvm_rl.rollout_data import load_rollouts

    (args,) = parse_recipe((PredictArguments,), argv)
    check_output_dir(args.output_dir, {"lenvm_model_path": args.lenvm_model_path, "rollouts_path": args.rollouts_path})
    claim_output_dir(args.output_dir)
    model = load_lenvm(args.lenvm_model_path).to(inference_device())
    tokenizer = load_tokenizer(args.lenvm_model_path)
    rows = load_rollouts(args.rollouts_path)
    check_lenvm_reads_rollouts(args.lenvm_model_path, model, rows, args.rollouts_path)
    if args.num_prompts is not None:
        keep = sorted(set(rows["prompt_id"]))[: args.num_prompts]
        rows = rows.filter(lambda p: p in set(keep), input_columns="prompt_id")
    rows = rows.filter(lambda f: f, input_columns="finished")
    if len(rows) == 0:
        from lenvm_rl.errors import ConfigError

        raise ConfigError(f"rollouts_path: {args.rollouts_path} has no finished rollout to compare against")
    gamma = model.config.gamma
    values = score_rollouts(model, rows, tokenizer.pad_token_id, args.batch_size)

    per_prompt: dict[int, dict] = {}
    for row, v in zip(rows, values):
        entry = per_prompt.setdefault(
            row["prompt_id"], {"prompt_id": row["prompt_id"], "value_s0": float(v[0]), "lengths": []}
        )
        entry["lengths"].append(row["completion_tokens"])
    for entry in per_prompt.values():
        entry["predicted_tokens"] = float(
            remaining_from_value(torch.tensor(entry["value_s0"], dtype=torch.float64), gamma)
        )
        entry["ground_truth_tokens"] = float(
            prompt_boundary_ground_truth([torch.tensor(entry["lengths"], dtype=torch.float64)], gamma)[0]
        )
    metrics = length_metrics(rows, values, gamma, constant_baselines(model.config))

    print(f"{'prompt':>6}  {'predicted':>9}  {'L_GT':>7}  {'rel.err':>7}  sampled lengths")
    for e in per_prompt.values():
        rel = abs(e["predicted_tokens"] - e["ground_truth_tokens"]) / max(e["ground_truth_tokens"], 1e-9)
        print(
            f"{e['prompt_id']:>6}  {e['predicted_tokens']:>9.1f}  {e['ground_truth_tokens']:>7.1f}  {rel:>7.1%}  {sorted(e['lengths'])}"
        )
    print(f"prompt-boundary MRE: LenVM {metrics['boundary_mre']:.3f}")
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
    plot_value_trace(values[trace], rows[trace]["completion_tokens"], gamma, output_dir / "value_trace.png")
    result = {"gamma": gamma, "metrics": metrics, "prompts": list(per_prompt.values())}
    (output_dir / "predictions.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {output_dir / 'predictions.json'} and {output_dir / 'value_trace.png'}")
    return result
