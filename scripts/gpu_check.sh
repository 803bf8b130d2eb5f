#!/usr/bin/env bash
# Not yet run on a GPU (written and dry-run on CPU only). The testbed-size pipeline on one CUDA GPU, in bf16, with pass/fail and seconds per stage (target: <= 8 minutes):
#   testbed policy -> rollout -> train-lenvm -> grpo with the LenVM under 1-GPU DDP, ZeRO-2 and FSDP
#   -> evaluate with LenVM-guided decoding
#   bash scripts/gpu_check.sh [WHEEL_DIR]         (WHEEL_DIR from scripts/gpu_wheels.sh; installs what is missing)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  (print the stages and their commands, run nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${GPU_CHECK_RUNS:-runs/gpu_check}
wheels=${1:-}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
recipes=recipes/testbed
steps=${GPU_CHECK_GRPO_STEPS:-10}
launch="python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16"
grpo="-m lenvm_rl grpo --config $recipes/grpo/config_lenvm_lambda1.yaml --model_name_or_path $runs/sft
      --lenvm_model_path $runs/lenvm --max_steps $steps --bf16 true --use_cpu false --save_strategy no --report_to none"
stages=(
    "install|python3 -c 'import torch; assert torch.cuda.is_available(), \"no CUDA GPU\"' && if [ -n \"$wheels\" ]; then python3 -m pip install --no-index --find-links $wheels -e '.[deepspeed]'; fi && python3 -c 'import lenvm_rl, trl, deepspeed'"
    "policy|python3 -m lenvm_rl.testbed --output_dir $runs/sft"
    "rollout|python3 -m lenvm_rl rollout --config $recipes/rollout/config_testbed.yaml --model_name_or_path $runs/sft --output_dir $runs/rollouts --num_prompts 128 --dtype bfloat16"
    "train-lenvm|python3 -m lenvm_rl train-lenvm --config $recipes/lenvm/config_full.yaml --model_name_or_path $runs/sft --rollouts_path $runs/rollouts --output_dir $runs/lenvm --bf16 true --use_cpu false --report_to none"
    "grpo-ddp|$launch --config_file accelerate_configs/ddp.yaml $grpo --output_dir $runs/grpo_ddp"
    "grpo-zero2|$launch --config_file accelerate_configs/zero2.yaml $grpo --output_dir $runs/grpo_zero2"
    "grpo-fsdp|$launch --config_file accelerate_configs/fsdp.yaml $grpo --output_dir $runs/grpo_fsdp"
    "evaluate|python3 -m lenvm_rl evaluate --model_name_or_path $runs/grpo_ddp --lenvm_model_path $runs/lenvm --guided_decoding true --dataset_name testbed --budgets 8 16 32 --num_prompts 64 --max_new_tokens 48 --dtype bfloat16 --output_dir $runs/evaluate"
)
if [[ -n "${GPU_CHECK_DRY_RUN:-}" ]]; then
    for stage in "${stages[@]}"; do echo "${stage%%|*}: ${stage#*|}"; done
    exit 0
fi
mkdir -p "$runs"
failed=0
start_all=$SECONDS
for stage in "${stages[@]}"; do
    name=${stage%%|*}
    start=$SECONDS
    if bash -c "${stage#*|}" > "$runs/$name.log" 2>&1; then status=pass; else status=FAIL; failed=1; fi
    printf '%-12s %-4s %5d s   (%s)\n' "$name" "$status" $((SECONDS - start)) "$runs/$name.log"
    [[ $status == FAIL && $name == install ]] && break
done
printf '%-12s %-4s %5d s\n' total "$([[ $failed == 0 ]] && echo pass || echo FAIL)" $((SECONDS - start_all))
exit $failed
