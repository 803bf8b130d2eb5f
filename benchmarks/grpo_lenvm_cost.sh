#!/usr/bin/env bash
# 3 GRPO steps on SmolLM2 with and without the LenVM: step time, LenVM scoring share, peak RSS.
# Needs runs/smollm2/lenvm (make demo). Read step_time, length/scoring_time_s and "Maximum resident set size" from the logs.
set -u
cd "$(dirname "$0")/.."
R=recipes/SmolLM2-135M-Instruct/grpo/config_lenvm_budget.yaml
sed -e '/^lenvm_model_path:/d' -e 's/^length_objective: budget/length_objective: none/' $R > runs/grpo_cost_plain.yaml
/usr/bin/time -v python -m lenvm_rl grpo --config $R --max_steps 3 --output_dir runs/grpo_cost_lenvm --save_strategy no --disable_tqdm true > runs/grpo_cost_lenvm.log 2>&1
/usr/bin/time -v python -m lenvm_rl grpo --config runs/grpo_cost_plain.yaml --max_steps 3 --output_dir runs/grpo_cost_plain --save_strategy no --disable_tqdm true > runs/grpo_cost_plain.log 2>&1
