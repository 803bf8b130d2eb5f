"""Where the LenVM's per-token length credit goes in the testbed (docs/BENCHMARKS.md, "Where the LenVM's signal
is lost"): for a policy, sample completions of fresh budgeted prompts, score them with the study's LenVM, and report
the share of |A_len| that lands on the length decision (the ``####`` token), the mean |A_len| per token, and the
LenVM's predicted total length just before ``####`` against the realised length.

    python benchmarks/testbed_credit.py runs/testbed/sft runs/testbed/study/lenvm_lambda1/seed0 --lam 1.0
"""

from __future__ import annotations

import argparse

import torch

from lenvm_rl.advantages import length_advantages, lenvm_state_values
from lenvm_rl.budgets import add_budgets
from lenvm_rl.generation import generate_hf, tokenize_prompts
from lenvm_rl.loading import load_causal_lm, load_tokenizer
from lenvm_rl.modeling import load_lenvm
from lenvm_rl.returns import remaining_from_value
from lenvm_rl.testbed import ANSWER_MARKER, BUDGETS, make_testbed_dataset
from rewards.scores import budget_kind_codes


@torch.no_grad()
def credit(policy_path: str, lenvm, lam: float, num_prompts: int, samples: int, max_tokens: int) -> dict:
    policy, tokenizer = load_causal_lm(policy_path).eval(), load_tokenizer(policy_path)
    prompts = add_budgets(
        make_testbed_dataset(num_prompts, seed=21),
        budgets=list(BUDGETS),
        kinds=["exact", "at_most", "at_least"],
        seed=5,
    )
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"])
    marker, gamma = tokenizer.convert_tokens_to_ids(ANSWER_MARKER), lenvm.config.gamma
    shares, uniform, mean_abs, predicted, realised = [], [], [], [], []
    for row, ids, group in zip(
        prompts, prompt_ids, generate_hf(policy, tokenizer, prompt_ids, samples, max_tokens, 1.0)
    ):
        for completion, finished in group:
            if not finished or marker not in completion:
                continue
            tokens = completion + [tokenizer.eos_token_id]
            values_full = lenvm(input_ids=torch.tensor([ids + tokens])).length_values.float()  # (1, P + T)
            mask, done = torch.ones(1, len(tokens)), torch.tensor([True])  # (1, T), (1,)
            values = lenvm_state_values(values_full, len(ids), mask, done)  # (1, T + 1)
            advantages = length_advantages(
                values,
                mask,
                done,
                gamma,
                lam,
                "budget",
                budgets=torch.tensor([float(row["budget_tokens"])]),
                kinds=budget_kind_codes([row["budget_kind"]]),
                discount=1.0,
            )[0]  # (T,)
            decision = completion.index(marker)
            shares.append(advantages[decision].abs().item() / max(advantages.abs().sum().item(), 1e-12))
            uniform.append(1 / len(tokens))
            mean_abs.append(advantages.abs().mean().item())
            predicted.append(decision + remaining_from_value(values[0, decision], gamma).item())
            realised.append(len(completion))
    mean = lambda values: sum(values) / len(values)
    return {
        "completions": len(shares),
        "decision_share": mean(shares),
        "uniform_share": mean(uniform),
        "mean_abs_advantage": mean(mean_abs),
        "predicted_before_decision": mean(predicted),
        "realised_length": mean(realised),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policies", nargs="+")
    parser.add_argument("--lenvm", default="runs/testbed/lenvm")
    parser.add_argument("--lam", type=float, nargs="+", default=[1.0])
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lenvm = load_lenvm(args.lenvm).eval()
    for policy in args.policies:
        for lam in args.lam:
            torch.manual_seed(0)
            r = credit(policy, lenvm, lam, args.num_prompts, args.samples, max_tokens=48)
            print(
                f"{policy} λ={lam}: {r['completions']} completions; |A_len| share on '####' {r['decision_share']:.3f} "
                f"(uniform {r['uniform_share']:.3f}); mean |A_len| {r['mean_abs_advantage']:.3f}; LenVM total length "
                f"predicted just before '####' {r['predicted_before_decision']:.1f}, realised {r['realised_length']:.1f}"
            )


if __name__ == "__main__":
    main()
