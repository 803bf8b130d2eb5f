"""Calibration of the two budget potentials (issue 17): Φ = S(E[L | s_j], N) (``length_potential: point``) against
Φ = E[S(L, N) | s_j] under the constant-hazard law matched to the LenVM's value (``expected``), on fresh rollouts.

For every state s_j (j = 0 .. L - 1) of every finished rollout, each potential predicts the realised score S(L, N)
(exact budgets) and the probability of a hit (at most / at least budgets: ``budget_hit``); we compare the mean
prediction with the mean outcome, the squared error (Brier score for hits), and the binned calibration error (ECE:
10 equal-width bins of the prediction, |mean prediction - mean outcome| weighted by the bin's share). A reliability
diagram goes to ``--figure``, a table between markers into docs/BENCHMARKS.md.

    python benchmarks/potential_calibration.py            # after benchmarks/testbed.py has made runs/testbed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- calibration:begin (written by benchmarks/potential_calibration.py) -->", "<!-- calibration:end -->"
BINS = 10


def fresh_rollouts(runs: Path, path: Path, seed: int) -> None:
    """256 prompts x 8 samples of the starting policy, with a dataset seed and a sampling seed unlike the LenVM's."""
    if (path / "shards").exists():
        return
    recipe = ROOT / "recipes" / "testbed" / "rollout" / "config_testbed.yaml"
    command = [
        sys.executable,
        "-m",
        "lenvm_rl",
        "rollout",
        "--config",
        str(recipe),
        "--model_name_or_path",
        str(runs / "sft"),
        "--num_prompts",
        "256",
        "--dataset_seed",
        str(seed),
        "--seed",
        str(seed),
        "--output_dir",
        str(path),
    ]
    subprocess.run(command, cwd=ROOT, check=True)


def predictions(lenvm_path: Path, rollouts_path: Path, max_tokens: int) -> dict[str, torch.Tensor]:
    """One row per state s_j of a finished rollout: kind, both potentials' predictions of score and hit, outcomes."""
    from lenvm_rl.advantages import expected_length_score
    from lenvm_rl.critic_metrics import score_rollouts
    from lenvm_rl.loading import load_tokenizer
    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.returns import remaining_from_value
    from lenvm_rl.rollout_data import load_rollouts
    from rewards.scores import LENGTH_SCORES, budget_hit, budget_kind_codes

    model = load_lenvm(str(lenvm_path))
    gamma = model.config.gamma
    rows = load_rollouts(rollouts_path).filter(lambda row: row["finished"] and row["completion_tokens"] > 0)
    values = score_rollouts(model, rows, load_tokenizer(str(lenvm_path)).pad_token_id, batch_size=64)
    score = LENGTH_SCORES["lifebench"]
    hit = lambda lengths, budgets, kinds: budget_hit(lengths, budgets, kinds).double()
    out = {key: [] for key in ("kind", "point_score", "expected_score", "point_hit", "expected_hit", "score", "hit")}
    for row, value in zip(rows, values, strict=True):
        length = row["completion_tokens"]
        steps = torch.arange(length)  # s_0 .. s_{L-1}: the states in which a token is chosen
        v = value[:length].double()[None, :]  # (1, L)
        budget, kind = torch.tensor([[row["budget_tokens"]]]), budget_kind_codes([row["budget_kind"]])[:, None]
        predicted_length = steps[None, :] + remaining_from_value(v, gamma)
        cap = (max_tokens - steps).clamp(min=0)[None, :]
        out["kind"].append(kind.expand(1, length)[0])
        out["point_score"].append(score(predicted_length, budget, kind).double()[0])
        out["expected_score"].append(expected_length_score(v, gamma, cap, budget, kind, "lifebench", steps[None, :])[0])
        out["point_hit"].append(hit(predicted_length, budget, kind)[0])
        out["expected_hit"].append(expected_length_score(v, gamma, cap, budget, kind, hit, steps[None, :])[0])
        outcome = torch.tensor([float(length)])
        out["score"].append(score(outcome, budget[0], kind[0]).double().expand(length))
        out["hit"].append(hit(outcome, budget[0], kind[0]).expand(length))
        out.setdefault("boundary", []).append(steps == 0)
    return {key: torch.cat(parts) for key, parts in out.items()}


def calibration(predicted: torch.Tensor, outcome: torch.Tensor) -> dict[str, float]:
    bins = (predicted * BINS).long().clamp(max=BINS - 1)
    ece = sum(
        (bins == b).double().mean() * (predicted[bins == b].mean() - outcome[bins == b].mean()).abs()
        for b in range(BINS)
        if (bins == b).any()
    )
    return {
        "mean_predicted": predicted.mean().item(),
        "mean_outcome": outcome.mean().item(),
        "mse": ((predicted - outcome) ** 2).mean().item(),
        "ece": float(ece),
    }


def reliability(predicted: torch.Tensor, outcome: torch.Tensor) -> tuple[list[float], list[float]]:
    bins = (predicted * BINS).long().clamp(max=BINS - 1)
    kept = [b for b in range(BINS) if (bins == b).sum() >= 20]
    return [predicted[bins == b].mean().item() for b in kept], [outcome[bins == b].mean().item() for b in kept]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/testbed")
    parser.add_argument("--lenvm", default=None, help="default: <runs>/lenvm")
    parser.add_argument("--rollouts", default=None, help="default: fresh rollouts made in <runs>/rollouts_calibration")
    parser.add_argument("--seed", type=int, default=7, help="dataset and sampling seed of the fresh rollouts")
    parser.add_argument("--max-completion-tokens", type=int, default=48, help="the GRPO recipes' generation limit")
    parser.add_argument("--figure", default="docs/figures/potential_calibration.png")
    parser.add_argument("--docs", default="docs/BENCHMARKS.md", help="'' = print only")
    args = parser.parse_args(argv)
    runs = (ROOT / args.runs).resolve()
    rollouts = Path(args.rollouts) if args.rollouts else runs / "rollouts_calibration"
    if not args.rollouts:
        fresh_rollouts(runs, rollouts, args.seed)
    data = predictions(Path(args.lenvm) if args.lenvm else runs / "lenvm", rollouts, args.max_completion_tokens)

    cases = [
        ("exact", 0, "score", "mean length score"),
        ("at most", 1, "hit", "hit rate"),
        ("at least", 2, "hit", "hit rate"),
    ]
    lines = [
        "| budget kind | states | outcome | potential | states: mean predicted / realised | MSE | ECE "
        "| prompt boundary: mean predicted / realised | ECE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for axis, (name, code, target, label) in zip(axes, cases):
        chosen = data["kind"] == code
        for index, potential in enumerate(("point", "expected")):
            predicted, outcome = data[f"{potential}_{target}"][chosen], data[target][chosen]
            at_boundary = data["boundary"][chosen]
            every, boundary = calibration(predicted, outcome), calibration(predicted[at_boundary], outcome[at_boundary])
            results[f"{name}/{potential}"] = {"states": every, "boundary": boundary, "count": int(chosen.sum())}
            lines.append(
                f"| {name} | {int(chosen.sum())} | {label} | {potential} | {every['mean_predicted']:.3f} / "
                f"{every['mean_outcome']:.3f} | {every['mse']:.4f} | {every['ece']:.3f} | "
                f"{boundary['mean_predicted']:.3f} / {boundary['mean_outcome']:.3f} | {boundary['ece']:.3f} |"
            )
            xs, ys = reliability(predicted, outcome)
            axis.plot(
                xs,
                ys,
                "o-",
                color=f"C{index}",
                label=f"{potential}: S(E[L])" if potential == "point" else "expected: E[S(L)]",
            )
        axis.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
        axis.set_title(f"{name}: {label}", fontsize=9)
        axis.set_xlabel("predicted at s_j")
        axis.set_ylabel("realised")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    (ROOT / args.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(ROOT / args.figure, dpi=110)
    plt.close(figure)
    (runs / "potential_calibration.json").write_text(json.dumps(results, indent=2))
    table = "\n".join(lines)
    print(table)
    if args.docs:
        command = "python benchmarks/potential_calibration.py " + " ".join(sys.argv[1:])
        section = (
            f"Command: `{command.strip()}` (LenVM `{args.runs}/lenvm`, rollouts `{rollouts.relative_to(ROOT) if rollouts.is_relative_to(ROOT) else rollouts}`, "
            f"finished rows only).\n\n{table}\n\n![calibration]({Path(args.figure).relative_to('docs')})"
        )
        docs = ROOT / args.docs
        text = docs.read_text()
        if BEGIN not in text:
            text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
        docs.write_text(text[: text.index(BEGIN)] + f"{BEGIN}\n{section}\n{END}" + text[text.index(END) + len(END) :])


if __name__ == "__main__":
    main()
