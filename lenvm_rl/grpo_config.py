"""``LenVMGRPOConfig``: TRL's ``GRPOConfig`` plus the LenVM critic's fields (``lenvm-rl grpo``, and ``ppo``'s base).

The fields' meaning and the math they select are docs/DESIGN.md §3 (advantage modes, baselines, potentials, EOS
and truncation, the two discounts) and §4.2 (the trainer that reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trl import GRPOConfig

from lenvm_rl.advantages import IMPORTANCE_MODES, LENGTH_ADVANTAGE_MODES, LENGTH_POTENTIALS
from lenvm_rl.decoding import GUIDANCE_MODES
from lenvm_rl.errors import ConfigError, check_training_counts
from lenvm_rl.precision import resolve_bf16
from rewards.scores import LENGTH_SCORES

LENGTH_OBJECTIVES = (*LENGTH_ADVANTAGE_MODES, "none")
LENGTH_BASELINES = ("lenvm", "group")
LENVM_UPDATES = ("frozen", "live")
LENGTH_ADVANTAGE_SCALES = ("batch", "first")
LENGTH_SCALE_FILE = "length_advantage_scale.json"  # length_advantage_scale first: its kept scale, in checkpoints
BUDGET_COLUMNS = ("budget_tokens", "budget_kind")
LIVE_LENVM_DIR = "lenvm"  # the live critic's folder inside output_dir and every checkpoint
LIVE_LENVM_OPTIMIZER = "lenvm_optimizer.pt"  # its optimizer state, in checkpoints only


@dataclass
class LenVMGRPOConfig(GRPOConfig):
    """TRL's `GRPOConfig` plus the LenVM critic's fields; every field of GRPOConfig keeps TRL's meaning.

    The math each field selects is docs/DESIGN.md §3.7-§3.11; the trainer that reads them, §4.2.

    Parameters:
        > Parameters that control the LenVM critic (docs/DESIGN.md §3.6, §5)

        lenvm_model_path (`str` or `None`, *optional*):
            Output folder of `lenvm-rl train-lenvm`; with length_objective none it feeds metrics only.
        lenvm_update (`str`, *optional*, defaults to `"frozen"`):
            frozen, or live: the LenVM keeps learning from every training batch (saved to <output_dir>/lenvm).
        lenvm_learning_rate (`float`, *optional*, defaults to `1e-05`):
            AdamW learning rate of the live LenVM.
        lenvm_epochs (`int`, *optional*, defaults to `1`):
            Passes of the live LenVM over each generation batch.
        lenvm_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per LenVM forward pass (and update).

        > Parameters that control the length advantage (docs/DESIGN.md §3.7-§3.9, §3.11)

        length_objective (`str`, *optional*, defaults to `"budget"`):
            budget (hit the prompt's budget), efficiency (c > 0: shorter), shaping, or none.
        length_advantage_coef (`float`, *optional*, defaults to `1.0`):
            c in A_task + c · A_len; >= 0 for budget/shaping, any sign for efficiency.
        length_gamma (`float` or `None`, *optional*):
            γ that turns LenVM values into lengths; default: the LenVM's own γ.
        length_lambda (`float`, *optional*, defaults to `1.0`):
            GAE λ of the length advantage, in [0, 1].
        length_discount (`float`, *optional*, defaults to `1.0`):
            RL discount d of δ and the GAE sum; 1 because GRPO's sequence reward is undiscounted.
        length_score (`str`, *optional*, defaults to `"lifebench"`):
            Budget score S: lifebench or l1.
        length_baseline (`str`, *optional*, defaults to `"lenvm"`):
            Budget baseline at the prompt boundary: lenvm (Φ(s_0)) or group (the group's mean realised score;
            unwhitened, divided by its std when scale_rewards is group); needs >= 2 generations.
        length_potential (`str`, *optional*, defaults to `"point"`):
            Budget potential: point (S of the LenVM's expected length) or expected (E[S(L)] under a constant stop hazard
            matched to the LenVM's value).
        eos_credit (`bool`, *optional*, defaults to `False`):
            The EOS action carries the length advantage of stopping (V(s_L) kept).

        > Parameters that control its scale (docs/DESIGN.md §3.10)

        whiten_length_advantage (`bool`, *optional*, defaults to `True`):
            Normalise A_len over the valid tokens of all ranks to the scale of A_task (length_advantage_scale says how).
        length_advantage_scale (`str`, *optional*, defaults to `"batch"`):
            With whiten_length_advantage: batch (mean 0, std 1 in every batch) or first (divided by the std of the first
            training batch's A_len, kept for the run and in checkpoints, not centred: A_len shrinks as budgets are met
            instead of the critic's leftover error being scaled back up to std 1).

        > Parameters that control guided exploration (docs/DESIGN.md §3.14)

        guided_generations (`int`, *optional*, defaults to `0`):
            k of the num_generations completions of each prompt are sampled under the LenVM (the last k of each
            group, training only) and importance-corrected; 0 samples every completion from the policy.
        guidance_mode (`str`, *optional*, defaults to `"score"`):
            score (p · S(predicted length)^β, budget-aware), tilt (p · exp(βV): β > 0 shorter), or select.
        guidance_beta (`float`, *optional*, defaults to `4.0`):
            β of the score and tilt modes.
        guidance_top_k (`int`, *optional*, defaults to `8`):
            Candidates the LenVM scores at each step (the policy's top k).
        guidance_floor (`float`, *optional*, defaults to `0.1`):
            ε in μ = (1 - ε) guided + ε policy, over the whole vocabulary: every token stays reachable and
            π / μ <= 1 / ε. In (0, 1].
        guided_importance_cap (`float`, *optional*, defaults to `10.0`):
            C in w = min(π_old / μ, C); with C >= 1 / guidance_floor only the guide's own preferences are clipped.
        guided_importance_min (`float`, *optional*, defaults to `0.0`):
            C_min: weights below it are raised to it (truncate modes) or masked; C_min = C = 1 turns the correction
            off (w = 1: a biased estimator that learns from guided samples at full weight).
        guided_importance_mode (`str`, *optional*, defaults to `"token_truncate"`):
            TRL's vLLM correction modes: token_truncate, token_mask, sequence_truncate, sequence_mask (sequence ratios
            of long completions collapse towards 0 or C).
        guided_baseline (`str`, *optional*, defaults to `"all"`):
            all: a group's baseline is the mean reward of all its rows (TRL's); plain: of its plain rows only, so that
            guided rewards do not shift it (also the anchors of length_baseline: group).
        guided_when (`str`, *optional*, defaults to `"always"`):
            always: the last k rows of every group are guided; plain_miss: only in groups whose plain rows all missed
            their budget (the plain rows are sampled first; elsewhere those k rows are sampled from the policy).

        > Parameters that control precision (docs/DESIGN.md §7)

        bf16 (`str`, *optional*, defaults to `"auto"`):
            bf16 autocast: true, false, or auto (bf16 where the device computes it natively, float32 elsewhere;
            lenvm_rl.precision). Resolved to true / false before training.
    """

    # GRPO's baseline is the group mean, so it needs >= 2 completions per prompt; PPO's critic allows 1.
    min_generations: ClassVar[int] = 2

    lenvm_model_path: str | None = field(
        default=None,
        metadata={"help": "Output folder of `lenvm-rl train-lenvm`; with length_objective none it feeds metrics only."},
    )
    length_objective: str = field(
        default="budget",
        metadata={"help": "budget (hit the prompt's budget), efficiency (c > 0: shorter), shaping, or none."},
    )
    length_advantage_coef: float = field(
        default=1.0, metadata={"help": "c in A_task + c · A_len; >= 0 for budget/shaping, any sign for efficiency."}
    )
    length_gamma: float | None = field(
        default=None, metadata={"help": "γ that turns LenVM values into lengths; default: the LenVM's own γ."}
    )
    length_lambda: float = field(default=1.0, metadata={"help": "GAE λ of the length advantage, in [0, 1]."})
    length_discount: float = field(
        default=1.0,
        metadata={"help": "RL discount d of δ and the GAE sum; 1 because GRPO's sequence reward is undiscounted."},
    )
    length_score: str = field(default="lifebench", metadata={"help": "Budget score S: lifebench or l1."})
    whiten_length_advantage: bool = field(
        default=True,
        metadata={
            "help": "Normalise A_len over the valid tokens of all ranks to the scale of A_task "
            "(length_advantage_scale says how)."
        },
    )
    length_advantage_scale: str = field(
        default="batch",
        metadata={
            "help": "With whiten_length_advantage: batch (mean 0, std 1 in every batch) or first (divided by "
            "the std of the first training batch's A_len, kept for the run and in checkpoints, not "
            "centred: A_len shrinks as budgets are met instead of the critic's leftover error being "
            "scaled back up to std 1)."
        },
    )
    length_baseline: str = field(
        default="lenvm",
        metadata={
            "help": "Budget baseline at the prompt boundary: lenvm (Φ(s_0)) or group (the group's mean realised "
            "score; unwhitened, divided by its std when scale_rewards is group); needs >= 2 generations."
        },
    )
    length_potential: str = field(
        default="point",
        metadata={
            "help": "Budget potential: point (S of the LenVM's expected length) or expected (E[S(L)] under a "
            "constant stop hazard matched to the LenVM's value)."
        },
    )
    eos_credit: bool = field(
        default=False, metadata={"help": "The EOS action carries the length advantage of stopping (V(s_L) kept)."}
    )
    lenvm_update: str = field(
        default="frozen",
        metadata={
            "help": "frozen, or live: the LenVM keeps learning from every training batch (saved to <output_dir>/lenvm)."
        },
    )
    lenvm_learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the live LenVM."})
    lenvm_epochs: int = field(default=1, metadata={"help": "Passes of the live LenVM over each generation batch."})
    lenvm_batch_size: int = field(default=8, metadata={"help": "Sequences per LenVM forward pass (and update)."})
    guided_generations: int = field(
        default=0,
        metadata={
            "help": "k of the num_generations completions of each prompt are sampled under the LenVM (the last k "
            "of each group, training only) and importance-corrected; 0 samples every completion from the policy."
        },
    )
    guidance_mode: str = field(
        default="score",
        metadata={
            "help": "score (p · S(predicted length)^β, budget-aware), tilt (p · exp(βV): β > 0 shorter), or select."
        },
    )
    guidance_beta: float = field(default=4.0, metadata={"help": "β of the score and tilt modes."})
    guidance_top_k: int = field(
        default=8, metadata={"help": "Candidates the LenVM scores at each step (the policy's top k)."}
    )
    guidance_floor: float = field(
        default=0.1,
        metadata={
            "help": "ε in μ = (1 - ε) guided + ε policy, over the whole vocabulary: every token stays reachable and "
            "π / μ <= 1 / ε. In (0, 1]."
        },
    )
    guided_importance_cap: float = field(
        default=10.0,
        metadata={
            "help": "C in w = min(π_old / μ, C); with C >= 1 / guidance_floor only the guide's own preferences are "
            "clipped."
        },
    )
    guided_importance_min: float = field(
        default=0.0,
        metadata={
            "help": "C_min: weights below it are raised to it (truncate modes) or masked; C_min = C = 1 turns the "
            "correction off (w = 1: a biased estimator that learns from guided samples at full weight)."
        },
    )
    guided_importance_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "TRL's vLLM correction modes: token_truncate, token_mask, sequence_truncate, sequence_mask "
            "(sequence ratios of long completions collapse towards 0 or C)."
        },
    )
    guided_baseline: str = field(
        default="all",
        metadata={"help": "all: the group baseline over every row (TRL's); plain: over the group's plain rows only."},
    )
    guided_when: str = field(
        default="always",
        metadata={
            "help": "always: k guided rows in every group; plain_miss: only in groups whose plain rows all missed "
            "their budget (elsewhere those rows are sampled from the policy)."
        },
    )
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: true, false, or auto (bf16 where the device computes it natively, float32 "
            "elsewhere; lenvm_rl.precision). Resolved to true / false before training."
        },
    )

    def __post_init__(self):
        self.bf16 = resolve_bf16(self.bf16, self.use_cpu, self.fp16)
        check_training_counts(self)  # before TRL's own checks, some of which divide by these counts
        for name in ("num_generations", "max_completion_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:  # TRL always samples: 0 would divide the logits by zero at the first generation
            raise ConfigError(f"temperature: must be > 0 (GRPO samples its completions), got {self.temperature}")
        try:
            super().__post_init__()
        except ValueError as error:  # TRL's group-size checks speak of generation_batch_size, rarely set by hand
            if "generations" not in str(error):
                raise
            # TRL's last generation check refuses 1, which a critic baseline (PPO) allows; only TRL's vLLM
            # importance-sampling clip checks come after that check, and are skipped then.
            if self.num_generations < self.min_generations or "at least 2 generations" not in str(error):
                raise ConfigError(
                    f"num_generations: {self.num_generations} completions per prompt must be >= "
                    f"{self.min_generations} and divide the batch "
                    f"(per_device_train_batch_size x processes x steps_per_generation; per_device_eval_batch_size x "
                    f"processes for evaluation); TRL says: {str(error).splitlines()[0]}"
                ) from None
        if self.length_objective not in LENGTH_OBJECTIVES:
            raise ConfigError(
                f"length_objective: {self.length_objective!r} is unknown; use one of {', '.join(LENGTH_OBJECTIVES)}"
            )
        if self.length_objective != "none" and self.lenvm_model_path is None:
            raise ConfigError(
                f"lenvm_model_path: length_objective {self.length_objective!r} needs a LenVM; give the output_dir of "
                f"`lenvm-rl train-lenvm`, or set length_objective: none"
            )
        # Budget and shaping advantages point towards the budget / the LenVM's shorter states; a negative c would
        # push away. Efficiency is a direction, not a target: c > 0 prefers shorter, c < 0 longer completions.
        if self.length_objective in ("budget", "shaping") and self.length_advantage_coef < 0:
            raise ConfigError(
                f"length_advantage_coef: must be >= 0 for length_objective {self.length_objective!r}, got "
                f"{self.length_advantage_coef}; a negative coefficient pushes away from the objective"
            )
        if self.length_gamma is not None and not 0.0 < self.length_gamma < 1.0:
            raise ConfigError(f"length_gamma: must lie in (0, 1) or be unset (the LenVM's γ), got {self.length_gamma}")
        if not 0.0 <= self.length_lambda <= 1.0:
            raise ConfigError(f"length_lambda: must lie in [0, 1], got {self.length_lambda}")
        if not 0.0 < self.length_discount <= 1.0:
            raise ConfigError(
                f"length_discount: must lie in (0, 1] (1 matches GRPO's undiscounted objective), "
                f"got {self.length_discount}"
            )
        if self.length_score not in LENGTH_SCORES:
            raise ConfigError(f"length_score: {self.length_score!r} is unknown; use one of {', '.join(LENGTH_SCORES)}")
        if self.lenvm_batch_size < 1:
            raise ConfigError(f"lenvm_batch_size: must be a positive number of sequences, got {self.lenvm_batch_size}")
        choices = {
            "length_baseline": LENGTH_BASELINES,
            "length_potential": LENGTH_POTENTIALS,
            "lenvm_update": LENVM_UPDATES,
            "length_advantage_scale": LENGTH_ADVANTAGE_SCALES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is unknown; use one of {', '.join(allowed)}")
        budget_only = {"length_baseline": "lenvm", "length_potential": "point"}
        for name, default in budget_only.items():
            if getattr(self, name) != default and self.length_objective != "budget":
                raise ConfigError(
                    f"{name}: {getattr(self, name)!r} applies to length_objective 'budget' only, got "
                    f"{self.length_objective!r}; set {name}: {default} or length_objective: budget"
                )
        if self.length_baseline == "group" and self.num_generations < 2:
            raise ConfigError(
                f"length_baseline: 'group' needs a group, got num_generations {self.num_generations}; set "
                f"num_generations >= 2 or length_baseline: lenvm"
            )
        if self.lenvm_update == "live" and self.lenvm_model_path is None:
            raise ConfigError("lenvm_update: 'live' needs a LenVM to train; set lenvm_model_path")
        if self.lenvm_learning_rate <= 0:
            raise ConfigError(f"lenvm_learning_rate: must be > 0, got {self.lenvm_learning_rate}")
        if self.lenvm_epochs < 1:
            raise ConfigError(f"lenvm_epochs: must be a positive number of passes, got {self.lenvm_epochs}")
        # vLLM reports each sampled token's log-prob after its top-p cut and renormalisation (TRL starts it with
        # logprobs_mode="processed_logprobs"); TRL's trainer recomputes it over the whole vocabulary. Their ratio is
        # then the product of the nucleus masses, < 1 and falling with length: TRL's default sequence-level correction
        # would weigh every completion's loss down by it, the longer ones the most (docs/DESIGN.md §6.5).
        if self.use_vllm and self.vllm_importance_sampling_correction and self.top_p < 1.0:
            raise ConfigError(
                f"top_p: {self.top_p} with use_vllm biases TRL's vLLM importance-sampling ratio against long "
                f"completions (vLLM's log-probs are renormalised over the top-p nucleus, the trainer's are not); set "
                f"top_p: 1.0, or vllm_importance_sampling_correction: false"
            )
        self.check_guided_exploration()

    def check_guided_exploration(self) -> None:
        """The guided-exploration fields (docs/DESIGN.md §3.14)."""
        if self.guided_generations == 0:
            return
        if not 0 < self.guided_generations <= self.num_generations:
            raise ConfigError(
                f"guided_generations: must lie in [0, num_generations = {self.num_generations}], got "
                f"{self.guided_generations}"
            )
        if self.lenvm_model_path is None:
            raise ConfigError("guided_generations: guidance needs a LenVM; set lenvm_model_path")
        if self.use_vllm:
            raise ConfigError(
                "guided_generations: guided sampling runs with transformers' generate only; set use_vllm: false "
                "or guided_generations: 0"
            )
        choices = {
            "guidance_mode": GUIDANCE_MODES,
            "guided_importance_mode": IMPORTANCE_MODES,
            "guided_baseline": ("all", "plain"),
            "guided_when": ("always", "plain_miss"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is unknown; use one of {', '.join(allowed)}")
        if self.guidance_top_k < 1:
            raise ConfigError(f"guidance_top_k: must be a positive number of candidates, got {self.guidance_top_k}")
        if not 0.0 < self.guidance_floor <= 1.0:
            raise ConfigError(
                f"guidance_floor: must lie in (0, 1], got {self.guidance_floor}; at 0 the tokens outside the guide's "
                f"candidates are never sampled and no importance weight can correct for them"
            )
        if self.guided_importance_cap < 1.0:
            raise ConfigError(f"guided_importance_cap: must be >= 1, got {self.guided_importance_cap}")
        if not 0.0 <= self.guided_importance_min <= 1.0:
            raise ConfigError(f"guided_importance_min: must lie in [0, 1], got {self.guided_importance_min}")
        if self.guided_when == "plain_miss" and self.guided_generations == self.num_generations:
            raise ConfigError(
                f"guided_when: 'plain_miss' judges a group by its plain rows, and guided_generations = "
                f"num_generations = {self.num_generations} leaves none; lower guided_generations or set guided_when: "
                f"always"
            )
        if self.guided_baseline == "plain" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ConfigError(
                "guided_baseline: 'plain' recomputes TRL's sum_then_normalize advantage; set "
                "multi_objective_aggregation: sum_then_normalize or guided_baseline: all"
            )
