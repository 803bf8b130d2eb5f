#!/usr/bin/env bash
# The main job (`make demo`): SmolLM2 rollouts -> LenVM -> prompt-boundary prediction, LenVM-guided decoding
# against the base model and hard truncation, and LenVM-shaped GRPO learning budgets on the learning testbed.
# scripts/demo.py says what runs and at which sizes; every stage resumes. Precision: `auto` (bf16 where the CPU has
# AMX / AVX512-BF16, float32 elsewhere); LENVM_RL_PRECISION=float32 forces float32.
set -euo pipefail
exec python3 scripts/demo.py "$@"
