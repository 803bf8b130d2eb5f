"""Score rollouts with a LenVM and measure how well it predicts length.

Metrics (finished rollouts only: a truncated one has no known length):
- ``value_mse``: token-mean squared error of V(s_t) against G_t = -(1 - γ^(L - t)).
- ``length_mae_p{q}`` / ``length_rel_err_p{q}``: at relative position q ∈ {0, 25, 50, 75} % of each
  completion (t = floor(q L)), |l̂ - (L - t)| and that over (L - t), with l̂ = ln(1 + V)/ln γ.
- ``boundary_mre``: the paper's §4.4 prompt-boundary MRE: per prompt, L_GT from the N sampled
  lengths (μ = mean(1 - γ^Li), L_GT = ln(1 - μ)/ln γ) against L̂ = ln(1 + V(s_0))/ln γ.
- ``boundary_value_mae``: the same comparison in value space, |V(s_0) + μ| (no Jensen bias).
- ``constant_mre``: the MRE of a constant predictor, the mean training length.
- ``constant_value_mre``: the MRE of the constant that is best in value space, the training set's
  pooled L_GT = ln(1 - mean(1 - γ^L)) / ln γ (lower than the mean length, by Jensen): a LenVM that
  ignored its prompt would converge there, so this is the baseline that shows prompt conditioning.

A two-value LenVM (``segment_values``) gets ``segment_length_metrics``: ``value_mse`` over both values and, per
segment (thinking, answer), the prompt-boundary ``{segment}_boundary_mre`` and ``{segment}_boundary_value_mae``
against the segment lengths of the prompt's samples.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from lenvm_rl.errors import ConfigError
from lenvm_rl.returns import (
    mean_relative_error,
    prompt_boundary_ground_truth,
    remaining_from_value,
    segment_value_targets,
    value_from_remaining,
    value_targets,
)
from rewards.segments import SEGMENTS

RELATIVE_POSITIONS = (0.0, 0.25, 0.5, 0.75)


def check_token_ids(rollouts, vocab_size: int, name: str, path: str) -> None:
    """Refuse rollouts holding a token id the model has no embedding for (an IndexError deep in the forward)."""
    import pyarrow.compute as pc

    from lenvm_rl.errors import ConfigError

    for column in ("prompt_ids", "completion_ids"):
        if column not in rollouts.column_names:
            raise ConfigError(
                f"{name}: {path} is not a rollout dataset (no {column!r} column); make one with `lenvm-rl rollout`"
            )
        low, high = pc.min_max(pc.list_flatten(rollouts.data.column(column))).values()
        if high.as_py() is not None and (low.as_py() < 0 or high.as_py() >= vocab_size):
            bad = high.as_py() if high.as_py() >= vocab_size else low.as_py()
            raise ConfigError(
                f"{name}: {path} holds token id {bad} in {column}, outside the model's {vocab_size}-token vocabulary; "
                f"the rollouts were sampled with another tokenizer: use rollouts of this model's policy"
            )


def check_lenvm_reads_rollouts(lenvm_path: str, model, rollouts, rollouts_path: str) -> None:
    """predict-length and length-tokens: the LenVM must read the rollouts' token ids as the policy that sampled them
    (named in the rollouts' manifest) wrote them: every id has an embedding and the two tokenizers are the same."""
    import json
    import sys
    from pathlib import Path

    from lenvm_rl.errors import ConfigError
    from lenvm_rl.loading import load_tokenizer
    from lenvm_rl.modeling import check_lenvm_tokenizer
    from lenvm_rl.rollout_data import MANIFEST

    check_token_ids(rollouts, model.backbone.get_input_embeddings().num_embeddings, "rollouts_path", rollouts_path)
    manifest = Path(rollouts_path) / MANIFEST
    policy = json.loads(manifest.read_text()).get("model_name_or_path") if manifest.is_file() else None
    if policy is None:
        return
    try:
        policy_tokenizer = load_tokenizer(policy)
    except ConfigError:  # moved or offline: the id check above is all that can be done
        print(
            f"lenvm-rl: warning: cannot load the policy {policy!r} that sampled {rollouts_path} ({manifest}) to compare "
            f"its tokenizer with the LenVM's; only the token ids were checked",
            file=sys.stderr,
        )
        return
    check_lenvm_tokenizer(lenvm_path, policy_tokenizer)


def collate_states(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` = prompt + completion, and the positions of s_0 .. s_L (-1 = padding).

    s_t ends at token P - 1 + t, so the states of a row are its last L + 1 positions.
    """
    sequences = [row["prompt_ids"] + row["completion_ids"] for row in rows]
    width = max(map(len, sequences))
    num_states = max(len(row["completion_ids"]) + 1 for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    state_positions = torch.full((len(rows), num_states), -1, dtype=torch.long)
    for i, (row, sequence) in enumerate(zip(rows, sequences)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
        first = len(row["prompt_ids"]) - 1
        state_positions[i, : len(row["completion_ids"]) + 1] = torch.arange(first, len(sequence))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "state_positions": state_positions,
        "completion_tokens": torch.tensor([row["completion_tokens"] for row in rows]),
        "finished": torch.tensor([row["finished"] for row in rows]),
        **(
            {name: torch.tensor([row[name] for row in rows]) for name in ("thinking_tokens", "thinking_closed")}
            if "thinking_tokens" in rows[0]
            else {}
        ),
    }


def labelled_states(batch: dict[str, torch.Tensor], drop_truncated: bool, segment_values: bool) -> torch.Tensor:
    """How many (state, value) pairs of a collated batch the LenVM's loss labels: its ``num_items_in_batch``."""
    valid = batch["state_positions"] >= 0  # (B, S)
    lengths, finished, num_states = batch["completion_tokens"], batch["finished"].bool(), valid.size(1)
    # The masks do not depend on γ or on the bootstrap values, only on whether there are any.
    bootstrap = None if drop_truncated else torch.zeros(len(lengths), 1 + segment_values)
    if segment_values:
        thinking, closed = batch["thinking_tokens"], batch["thinking_closed"]
        mask = segment_value_targets(lengths, thinking, closed, finished, num_states, 0.5, bootstrap)[1]
        return (mask & valid[..., None]).sum()
    return (
        value_targets(lengths, finished, num_states, 0.5, None if bootstrap is None else bootstrap[:, 0])[1] & valid
    ).sum()


def require_segments(rows, name: str) -> None:
    """Refuse rollouts without the segment columns a two-value LenVM trains or is measured on."""
    if "thinking_tokens" not in rows.column_names:
        raise ConfigError(
            f"{name}: these rollouts have no thinking_tokens / thinking_closed columns, which segment_values needs; "
            f"sample them with thinking_budgets or thinking_markers in the rollout recipe"
        )


@torch.no_grad()
def segment_length_metrics(rows, values: list[torch.Tensor], gamma: float) -> dict[str, float]:
    """The two-value metrics of the module docstring; ``values[i]`` is (L_i + 1, 2), thinking then answer."""
    finished = [(row, v) for row, v in zip(rows, values) if row["finished"]]
    if not finished:
        raise ValueError("eval rollouts: none finished; the metrics need finished completions")
    squared, count = 0.0, 0
    by_prompt = defaultdict(list)  # prompt -> [(thinking tokens, answer tokens, V(s_0) (2,))]
    for row, v in finished:
        length, thinking = row["completion_tokens"], row["thinking_tokens"]
        targets, _ = segment_value_targets(
            torch.tensor([length]),
            torch.tensor([thinking]),
            torch.tensor([True]),
            torch.tensor([True]),
            length + 1,
            gamma,
        )
        squared += float(((v.double() - targets[0].double()) ** 2).sum())
        count += 2 * (length + 1)
        by_prompt[row["prompt_id"]].append((thinking, length - thinking, v[0].double()))
    metrics = {"value_mse": squared / count}
    for index, segment in enumerate(SEGMENTS):
        samples = [torch.tensor([s[index] for s in group], dtype=torch.float64) for group in by_prompt.values()]
        truth = prompt_boundary_ground_truth(samples, gamma)
        boundary = torch.stack([group[0][2][index] for group in by_prompt.values()])
        keep = truth > 0  # a prompt whose samples all have no tokens in this segment has no relative error
        if keep.any():
            predicted = remaining_from_value(boundary, gamma)[keep]
            metrics[f"{segment}_boundary_mre"] = float(mean_relative_error(predicted, truth[keep]))
        metrics[f"{segment}_boundary_value_mae"] = float((boundary - value_from_remaining(truth, gamma)).abs().mean())
    metrics["num_prompts"] = len(by_prompt)
    return metrics


def lenvm_metrics(config, rows, values: list[torch.Tensor]) -> dict[str, float]:
    """The held-out metrics of a LenVM with ``config``: ``segment_length_metrics`` for a two-value one, else
    ``length_metrics`` with its constant baselines."""
    if config.segment_values:
        return segment_length_metrics(rows, values, config.gamma)
    return length_metrics(rows, values, config.gamma, constant_baselines(config))


def constant_baselines(config) -> dict[str, float | None]:
    """The two constant predictors a LenVM config records from its training rollouts."""
    return {"constant_mre": config.train_length_mean, "constant_value_mre": config.train_boundary_tokens}


@torch.no_grad()
def score_rollouts(model, rows, pad_token_id: int, batch_size: int = 8) -> list[torch.Tensor]:
    """V(s_0) .. V(s_L) (float32, on CPU) for every rollout row, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        inputs = collate_states(batch, pad_token_id)
        out = model(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            state_positions=inputs["state_positions"].to(device),
        )
        for row, v in zip(batch, out.length_values.float().cpu()):
            values.append(v[: len(row["completion_ids"]) + 1])
    model.train(was_training)
    return values


def length_metrics(
    rows, values: list[torch.Tensor], gamma: float, constants: dict[str, float | None] | None = None
) -> dict[str, float]:
    """The metrics of the module docstring, from rows and their scored values.

    ``constants`` maps a metric name (``constant_mre``, ``constant_value_mre``) to a constant
    predicted length in tokens; None entries are skipped.
    """
    finished = [(row, v) for row, v in zip(rows, values) if row["finished"]]
    if not finished:
        raise ValueError("eval rollouts: none finished; the metrics need finished completions")
    squared, count = 0.0, 0
    by_position = {q: ([], []) for q in RELATIVE_POSITIONS}
    by_prompt = defaultdict(lambda: ([], None))
    for row, v in finished:
        length = row["completion_tokens"]
        target = value_from_remaining(torch.arange(length, -1, -1, dtype=torch.float64), gamma)
        squared += float(((v.double() - target) ** 2).sum())
        count += length + 1
        predicted = remaining_from_value(v.double(), gamma)
        for q in RELATIVE_POSITIONS:
            t = int(q * length)
            remaining = length - t
            if remaining > 0:
                error = abs(float(predicted[t]) - remaining)
                by_position[q][0].append(error)
                by_position[q][1].append(error / remaining)
        lengths, _ = by_prompt[row["prompt_id"]]
        by_prompt[row["prompt_id"]] = (lengths + [length], float(v[0]))
    metrics = {"value_mse": squared / count}
    for q, (errors, relative) in by_position.items():
        if errors:
            metrics[f"length_mae_p{int(q * 100)}"] = sum(errors) / len(errors)
            metrics[f"length_rel_err_p{int(q * 100)}"] = sum(relative) / len(relative)
    truth = prompt_boundary_ground_truth([torch.tensor(l, dtype=torch.float64) for l, _ in by_prompt.values()], gamma)
    boundary = torch.tensor([v0 for _, v0 in by_prompt.values()], dtype=torch.float64)
    keep = truth > 0  # a prompt whose samples all have L = 0 has no relative error
    metrics["boundary_mre"] = float(mean_relative_error(remaining_from_value(boundary, gamma)[keep], truth[keep]))
    metrics["boundary_value_mae"] = float((boundary - value_from_remaining(truth, gamma)).abs().mean())
    for name, constant in (constants or {}).items():
        if constant is not None:
            metrics[name] = float(mean_relative_error(torch.full_like(truth[keep], constant), truth[keep]))
    metrics["num_prompts"] = len(by_prompt)
    return metrics
