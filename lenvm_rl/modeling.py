"""The Length Value Model: a causal-LM backbone with a scalar value head.

V(s_t) = -sigmoid(z_t), z_t = W2 · SiLU(W1 h_t + b1) + b2, read from the final hidden state h_t of the
last token of state s_t. V lies in (-1, 0) and estimates G_t = -(1 - γ^(L - t)) (docs/DESIGN.md §3.2).
The head computes in float32 whatever the backbone's dtype and whatever dtype its own weights are stored in
(``Float32Linear``): z is a logit whose tails matter (V near -1 is a long remaining generation), and bf16 has 8 bits
of mantissa (at |z| = 4-8 a bf16 step in z is 0.03, 10-20 tokens of predicted length at γ = 0.997). Its weights are
stored in float32, except under ZeRO-3 (``head_dtype``).

``LenVMModel`` is a ``PreTrainedModel`` with its own ``LenVMConfig`` (backbone config, γ, head size,
loss), so ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` work as for any model.

With ``segment_values`` the head has two outputs, V_think and V_answer: the remaining thinking and answer tokens of
a completion with a thinking section (``returns.segment_value_targets``). Two outputs of one head on one trunk: the
trunk's forward is the whole cost of a value, so a second trunk would double it, and what both values need (which
segment the state is in, the budgets in the prompt) is the same reading of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import ModelOutput

from lenvm_rl.errors import ConfigError
from lenvm_rl.returns import segment_value_targets, value_targets


@strict
class LenVMConfig(PreTrainedConfig):
    """Configuration of a Length Value Model.

    Fields: ``backbone_config`` (the causal LM's config), ``gamma`` (discount of the length return),
    ``head_hidden_size`` (width of the MLP head; default: the backbone's hidden size), ``value_loss``
    ("mse" or "bce"), ``bootstrap_truncated`` (regress truncated rollouts towards the model's own
    value at the cut instead of dropping them), ``train_length_mean`` (mean finished length of the
    training rollouts) and ``train_boundary_tokens`` (their pooled prompt-boundary length
    ln(1 - mean(1 - γ^L)) / ln γ, the best constant in value space): the two constant baselines.
    ``segment_values``: two values, remaining thinking and answer tokens, instead of one (module docstring).
    """

    model_type = "lenvm"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    backbone_config: dict | PreTrainedConfig | None = None
    gamma: float = 0.997
    head_hidden_size: int | None = None
    value_loss: str = "mse"
    bootstrap_truncated: bool = False
    train_length_mean: float | None = None
    train_boundary_tokens: float | None = None
    segment_values: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"gamma: must lie in (0, 1), got {self.gamma}")
        if self.value_loss not in ("mse", "bce"):
            raise ValueError(f"value_loss: must be 'mse' or 'bce', got {self.value_loss!r}")


@dataclass
class LenVMOutput(ModelOutput):
    """``length_values`` (B, S) in (-1, 0) and ``logits`` (B, S) float32, at every position, or at
    ``state_positions`` when given ((B, S, 2), thinking then answer, for a ``segment_values`` LenVM); ``loss`` is the token-mean value loss when targets are given;
    ``cache`` the backbone's cache when called with ``use_cache=True``."""

    loss: torch.Tensor | None = None
    # Not ``values``: a ModelOutput is a dict, and DDP's output walk calls ``output.values()``.
    length_values: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None


def head_dtype(backbone_dtype: torch.dtype) -> torch.dtype:
    """The dtype a head's weights are stored in beside a ``backbone_dtype`` backbone: float32, but the backbone's own
    under ZeRO-3, whose parameters must share one dtype (DeepSpeed's coalesced all-gather and its optimizer's flat
    buffers take one dtype; its fp32 master weights keep the training precision). The head computes in float32
    either way."""
    return backbone_dtype if is_deepspeed_zero3_enabled() else torch.float32


class Float32Linear(nn.Linear):
    """``nn.Linear`` computed in float32 from float32 upcasts of its input and weights, whatever dtype they are stored
    in: DeepSpeed (bf16) and FSDP's mixed precision (``param_dtype``) hand a head bf16 weights, and upcasting is exact,
    so the computation is the same under every launch config. Its own forward, so ZeRO-3 gathers its weights."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias)


class ValueHead(nn.Module):
    """z = W2 · SiLU(W1 h + b1) + b2 (B, S), float32, from hidden states (B, S, H), outside autocast, computed in
    float32 whatever the dtype of ``h`` and of the head's weights (``Float32Linear``). The LenVM's length head
    (V = -sigmoid(z)) and PPO's task value head (V = z, unbounded) are both this module.

    It calls its Linear submodules rather than ``F.linear`` on their weights: ZeRO-3 gathers a module's
    partitioned weights only around that module's own forward. ``zero_init``: W1 ~ N(0, 1/H), W2 = 0, b = 0, so
    z = 0 at the start (PPO's task head; the LenVM initialises its head in ``LenVMModel._init_weights``).
    """

    def __init__(self, hidden_size: int, head_hidden_size: int, zero_init: bool = False, num_values: int = 1):
        super().__init__()
        self.dense = Float32Linear(hidden_size, head_hidden_size)
        self.out = Float32Linear(head_hidden_size, num_values)
        if zero_init:
            nn.init.normal_(self.dense.weight, std=hidden_size**-0.5)
            nn.init.zeros_(self.dense.bias)
            nn.init.zeros_(self.out.weight)  # z = 0 at the start; W1 learns once W2 has moved
            nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            z = self.out(F.silu(self.dense(hidden)))  # (B, S, num_values) float32
        return z.squeeze(-1) if z.size(-1) == 1 else z


class LenVMModel(PreTrainedModel):
    config_class = LenVMConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The loss is normalised by the token count of the whole accumulated batch (`num_items_in_batch`).
    accepts_loss_kwargs = True
    _keep_in_fp32_modules_strict = ["head"]

    def __init__(self, config: LenVMConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        hidden_size = config.backbone_config.hidden_size
        self.head = ValueHead(hidden_size, config.head_hidden_size or hidden_size, num_values=1 + config.segment_values)
        self.post_init()

    def _init_weights(self, module):
        if module is self.head.out:
            # Start near V = -0.5 with small logits: gradients of the sigmoid are largest there.
            nn.init.normal_(module.weight, std=1e-3)
            nn.init.zeros_(module.bias)
        elif module is self.head.dense:
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.zeros_(module.bias)
        elif not isinstance(module, (LenVMModel, ValueHead)):
            super()._init_weights(module)

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, gamma: float, **config_kwargs) -> LenVMModel:
        """Wrap a loaded causal LM (its base model is kept, its LM head dropped) with a fresh head."""
        base = backbone.get_decoder() if hasattr(backbone, "get_decoder") else backbone
        config = LenVMConfig(backbone_config=backbone.config.to_dict(), gamma=gamma, **config_kwargs)
        model = cls(config, backbone=base).to(dtype=backbone.dtype)
        model.head.to(head_dtype(backbone.dtype))  # float32 beside a bf16/fp16 backbone, except under ZeRO-3
        return model

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        state_positions: torch.Tensor | None = None,
        completion_tokens: torch.Tensor | None = None,
        finished: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        thinking_tokens: torch.Tensor | None = None,
        thinking_closed: torch.Tensor | None = None,
        **kwargs,
    ) -> LenVMOutput:
        """Values at every position, or at ``state_positions`` (B, S) when given.

        With ``state_positions``, ``completion_tokens`` (B,) and ``finished`` (B,), the loss regresses
        V(s_t) (position ``state_positions[:, t]`` holds s_t) on the realised return. Truncated rows
        are dropped, or bootstrapped from the model's own detached V(s_T) when
        ``config.bootstrap_truncated``. The loss is the sum over valid states divided by
        ``num_items_in_batch`` (the valid states of the whole accumulated batch) or, without it, by
        this batch's count: a token mean, not a mean over sequences. A ``segment_values`` LenVM also needs
        ``thinking_tokens`` and ``thinking_closed`` (B,) and regresses both values (``segment_value_targets``);
        its loss is the mean over the labelled (state, value) pairs.
        """
        kwargs.pop("labels", None)
        kwargs.setdefault("use_cache", False)  # a cache only when asked for (guided decoding)
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = output.last_hidden_state
        if state_positions is not None:
            index = state_positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.size(-1))
            hidden = hidden.gather(1, index)  # (B, S, H)
        logits = self.head(hidden)  # (B, S) float32, (B, S, 2) with segment_values
        values = -torch.sigmoid(logits)
        loss = None
        if completion_tokens is not None:
            finished = finished.bool()
            last = completion_tokens.clamp(max=values.size(1) - 1)
            bootstrap = values.detach()[torch.arange(len(last)), last] if self.config.bootstrap_truncated else None
            if self.config.segment_values:
                if thinking_tokens is None or thinking_closed is None:
                    raise ConfigError(
                        "rollouts_path: a segment_values LenVM trains on rollouts with thinking_tokens and "
                        "thinking_closed; sample them with thinking budgets or thinking_markers in the rollout recipe"
                    )
                targets, mask = segment_value_targets(
                    completion_tokens,
                    thinking_tokens,
                    thinking_closed,
                    finished,
                    values.size(1),
                    self.config.gamma,
                    bootstrap,
                )
                mask &= (state_positions >= 0)[..., None]
            else:
                targets, mask = value_targets(completion_tokens, finished, values.size(1), self.config.gamma, bootstrap)
                mask &= state_positions >= 0
            if self.config.value_loss == "mse":
                per_state = (values - targets) ** 2
            else:  # BCE on the logit: P(still generating) = -V, target 1 - γ^(L-t) = -G_t.
                per_state = F.binary_cross_entropy_with_logits(logits, -targets, reduction="none")
            denominator = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
            loss = (per_state * mask).sum() / denominator
        return LenVMOutput(loss=loss, length_values=values, logits=logits, cache=output.cache)


AutoConfig.register("lenvm", LenVMConfig)
AutoModel.register(LenVMConfig, LenVMModel)


def load_lenvm(path: str, dtype: torch.dtype | None = None, two_values: bool = False) -> LenVMModel:
    """Load a saved LenVM; a folder that holds something else is refused with the fix, and so is a ``segment_values``
    LenVM unless the caller reads two values (``two_values``)."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        problem = "a folder without a model config" if Path(path).is_dir() else "no such folder, nor a reachable Hub id"
        raise ConfigError(
            f"lenvm_model_path: {path!r} is {problem}; give the output_dir of `lenvm-rl train-lenvm`"
        ) from None
    if not isinstance(config, LenVMConfig):
        raise ConfigError(
            f"lenvm_model_path: {path!r} holds a {config.model_type!r} model, not a LenVM; give the output_dir "
            f"of `lenvm-rl train-lenvm`"
        )
    if config.segment_values and not two_values:
        raise ConfigError(
            f"lenvm_model_path: {path!r} is a two-value LenVM (thinking and answer tokens, segment_values), which "
            f"reads prompts with thinking budgets (grpo, ppo) only; give a LenVM trained without segment_values, or "
            f"(grpo, ppo) add thinking_budgets to the recipe"
        )
    from safetensors import SafetensorError

    from lenvm_rl.loading import corrupt_weights, foreign_config

    try:
        return LenVMModel.from_pretrained(path, dtype=dtype or torch.float32)
    except SafetensorError as error:
        raise ConfigError(
            corrupt_weights("lenvm_model_path", path, error) + " (`lenvm-rl train-lenvm` writes it)"
        ) from None
    except RuntimeError as error:
        raise foreign_config("lenvm_model_path", path, error) from None


def check_lenvm_tokenizer(path: str, policy_tokenizer) -> None:
    """Refuse a LenVM whose saved tokenizer's vocabulary is not the policy's (its values would read other tokens)."""
    from transformers import AutoTokenizer

    try:
        lenvm_vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):
        lenvm_vocab = None
    policy_vocab = policy_tokenizer.get_vocab()
    if lenvm_vocab != policy_vocab:
        found = "holds no tokenizer" if lenvm_vocab is None else f"has a {len(lenvm_vocab)}-token vocabulary"
        raise ConfigError(
            f"lenvm_model_path: the LenVM at {path!r} {found}, not the policy's ({len(policy_vocab)} tokens); "
            f"LenVM and policy must share a tokenizer: train the LenVM on this policy's rollouts "
            f"(`lenvm-rl train-lenvm` saves the tokenizer beside it)"
        )
