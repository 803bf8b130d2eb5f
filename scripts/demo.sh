#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU): sample rollouts, train a LenVM and
# compare its prompt-boundary length prediction with constant baselines on held-out prompts, then run
# LenVM-shaped GRPO with budgets and print a before/after table (accuracy, mean tokens, length score per
# budget) with plots. Every stage resumes: rerunning after an interruption skips what is already written.
# GRPO_STEPS (default 12) sets the number of GRPO steps; a finished GRPO run is not repeated.
set -euo pipefail
recipes=recipes/SmolLM2-135M-Instruct
python -m lenvm_rl rollout --config $recipes/rollout/config_arithmetic.yaml "$@"
python -m lenvm_rl rollout --config $recipes/rollout/config_arithmetic_eval.yaml "$@"
python -m lenvm_rl train-lenvm --config $recipes/lenvm/config_top_layers.yaml
python -m lenvm_rl predict-length --lenvm_model_path runs/smollm2/lenvm \
    --rollouts_path runs/smollm2/rollouts_eval --output_dir runs/smollm2/predict
if [ ! -f runs/smollm2/grpo_lenvm/trainer_state.json ]; then
    python -m lenvm_rl grpo --config $recipes/grpo/config_lenvm_budget.yaml --max_steps "${GRPO_STEPS:-12}" \
        --save_strategy no --disable_tqdm true
fi
python -m lenvm_rl evaluate --config $recipes/evaluate/config_before_after.yaml
