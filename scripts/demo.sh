#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU): sample rollouts, train a LenVM,
# and compare its prompt-boundary length prediction with the constant baseline on held-out prompts.
# Every stage resumes: rerunning after an interruption skips what is already written.
set -euo pipefail
recipes=recipes/SmolLM2-135M-Instruct
python -m lenvm_rl rollout --config $recipes/rollout/config_arithmetic.yaml "$@"
python -m lenvm_rl rollout --config $recipes/rollout/config_arithmetic_eval.yaml "$@"
python -m lenvm_rl train-lenvm --config $recipes/lenvm/config_top_layers.yaml
python -m lenvm_rl predict-length --lenvm_model_path runs/smollm2/lenvm \
    --rollouts_path runs/smollm2/rollouts_eval --output_dir runs/smollm2/predict
