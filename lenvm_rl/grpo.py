"""GRPO with per-token LenVM length advantages (`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`).

How this departs from TRL's GRPO:
- After TRL generates and scores a batch, a Length Value Model scores cat(prompt, completion) once, without
  gradients, and its values V(s_0) .. V(s_T) become per-token length advantages A_len (B, T)
  (``advantages.length_advantages``: budget / efficiency / shaping). The advantage TRL's loss sees is
  A_j = A_task + c · A_len_j on completion tokens and 0 on padding, with A_task TRL's group-normalised
  sequence advantage broadcast over tokens. ``length_objective: none`` leaves TRL's advantages untouched.
- Scale: A_len is whitened over the valid tokens of the batch by default (``whiten_length_advantage``), so it
  enters at the scale of TRL's A_task, which is divided by its group's reward std. Unwhitened, c · A_len is a
  difference of scores in [0, 1] (0.1-0.3 per token on the testbed) against an A_task of order 1.
  ``length_advantage_scale: first`` divides every batch by the first training batch's std instead (kept, in
  checkpoints): whitened per batch, the LenVM's leftover error is scaled back up to std 1 once budgets are met,
  where a sequence-level reward's advantage falls to 0 (docs/BENCHMARKS.md, "Where the length critic pays").
- Baseline (budget objective): ``length_baseline: lenvm`` uses the LenVM's potential Φ(s_0) at the prompt
  boundary; ``group`` anchors it at the group's mean realised score, as TRL's advantage does for rewards, and
  keeps the LenVM's change Φ_j - Φ_0 within the completion (still a state-dependent baseline); unwhitened, the
  result is divided by the group's score std when ``scale_rewards`` is ``group`` (TRL's own field, its own
  meaning); whitened (the default), the whitening alone sets the scale.
- Potential (budget objective): ``length_potential: point`` scores the LenVM's expected length, S(E[L]);
  ``expected`` is E[S(L)] under a constant stop hazard matched to the LenVM's value
  (``advantages.expected_length_score``).
- EOS: TRL's completion_mask includes the EOS token. A completion is finished when its last masked token is
  one of TRL's ``eos_token_ids``; then L = mask.sum() - 1 (EOS excluded) and the EOS token is the action taken
  in s_L. By default V(s_L) := 0 and the EOS action gets no length advantage; ``eos_credit`` keeps the LenVM's
  V(s_L), so the decision to stop carries its own credit. A truncated completion (no EOS) bootstraps from V(s_T).
- Live critic (``lenvm_update: live``): the LenVM keeps learning from every training batch, with the token-mean
  targets of ``lenvm-rl train-lenvm`` (realised remaining lengths; truncated rows dropped or bootstrapped as the
  LenVM's config says), its own AdamW (``lenvm_learning_rate``) and ``lenvm_epochs`` passes per batch, after the
  advantages are computed from the values before the update (as PPO does). It is a separate model with its own
  optimizer, not a head on the policy's trunk: the trained LenVM is the exact starting point (a trunk head would
  need the LenVM's own features, which a full or top-layer LenVM fine-tune has moved away from the policy's), the
  policy gets no value-loss gradient, nothing of it reaches vLLM's weight sync, and the critic saved at the end is
  a plain LenVM folder (``<output_dir>/lenvm``) that predict-length, guided decoding and push read as they are. It
  is saved with its optimizer state in every checkpoint and restored on resume. Under DDP it is wrapped by the
  accelerator like the policy, so its gradients are averaged and the ranks keep identical weights.
- Discount: the RL discount d of δ and of the GAE sum defaults to 1 (``length_discount``), because GRPO's
  objective is the undiscounted sequence reward; γ (the LenVM's) only turns values into lengths.
- Prompts are left-padded: the LenVM gets position ids cumsum(mask) - 1, as for the unpadded sequences it
  was trained on.
- Guided exploration (``guided_generations: k``, ``lenvm_rl.guided_sampling``): the last k completions of each group
  are sampled with the LenVM in the sampler, μ = (1 - ε) guide + ε π, and their policy-gradient terms are weighted
  by w = min(π_old / μ, C) per token, the product TRL forms for its vLLM correction (docs/DESIGN.md §3.14).
- Two budgets (prompts with thinking budgets and a two-value LenVM, ``lenvm_rl.segment_trainer``): each token is
  credited against its own segment's budget, thinking tokens with V_think, answer tokens with V_answer
  (``segment_advantages.segment_length_advantages``), then whitened and added to A_task as above; the per-segment
  ``length/thinking_*`` and ``length/answer_*`` metrics replace the whole-completion ones (docs/DESIGN.md §3.15).

The config is ``lenvm_rl.grpo_config``, the trainer ``lenvm_rl.grpo_trainer`` (its hooks for subclasses there); the
entry point is ``lenvm_rl.train_policy``, shared with ``ppo``. Design: docs/DESIGN.md §4.2.
"""

from __future__ import annotations

from lenvm_rl.grpo_config import LENGTH_SCALE_FILE, LenVMGRPOConfig
from lenvm_rl.grpo_trainer import LenVMGRPOTrainer

__all__ = ["LENGTH_SCALE_FILE", "LenVMGRPOConfig", "LenVMGRPOTrainer", "main"]


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl grpo --config recipes/<Model>/grpo/config_<variant>.yaml`"""
    from lenvm_rl.train_policy import train_policy

    train_policy(argv, "grpo", LenVMGRPOConfig, LenVMGRPOTrainer)
