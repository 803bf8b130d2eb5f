"""Epochs after the first skip a top-layer LenVM's frozen decoder layers (docs/DESIGN.md §4.1).

With ``trainable_top_layers: N`` only the top N decoder layers, the final norm and the head learn; the layers below
compute the same hidden states for a rollout in every epoch (frozen, no dropout, right padding, positions from 0).
The first epoch records, per rollout (keyed by its token ids), the input of the first trainable layer; a training
batch whose rows are all recorded then runs the embedding and the top N layers only, the recorded states put in at
the first trainable layer. The first such batch is also run in full once and compared, so a backbone whose forward
does not allow the shortcut turns the cache off rather than training on wrong states. Written by hand: neither
transformers' Trainer nor PEFT caches the features of frozen layers.
"""

from __future__ import annotations

import torch
from torch import nn

from lenvm_rl.errors import ConfigError

# The recorded states may take at most this share of the memory available when training starts.
MEMORY_SHARE = 0.25
# The cached forward's final hidden states may differ from the full forward's by this much (‖Δ‖ / ‖full‖): under
# bf16 autocast a row's states depend on its batch's shapes (SmolLM2-135M: 0.009 between two batches; float32: 0);
# a wrong shortcut differs by O(1). The largest single |Δ| is no measure: bf16 moves one outlier by 0.2 × RMS.
TOLERANCE = 0.05


def cache_blocker(config, model_args, trainer) -> str | None:
    """Why the frozen-layer cache cannot run for this recipe, or None when it can."""
    if not config.trainable_top_layers:
        return "it needs trainable_top_layers (the layers below them are the ones cached)"
    if model_args.use_peft:
        return "LoRA adapts every layer, so no layer is frozen"
    if config.gradient_checkpointing:
        return "gradient_checkpointing recomputes the layers from their original inputs"
    if trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        return "ZeRO-3 and FSDP gather each layer's shards inside its forward"
    dropout = [
        name
        for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout")
        if getattr(trainer.model.config.backbone_config, name, 0) or 0
    ]
    if dropout:
        return f"the backbone's dropout ({', '.join(dropout)}) makes each epoch's frozen states differ"
    return None


def attach_trunk_cache(trainer, config, model_args, train_tokens: int) -> FrozenTrunkCache | None:
    """Attach the cache where ``cache_frozen_layers`` (auto / true / false) asks for it, and say the choice."""
    if config.cache_frozen_layers == "false":
        return None
    blocker = cache_blocker(config, model_args, trainer)
    if blocker is not None:
        if config.cache_frozen_layers == "true":
            raise ConfigError(f"cache_frozen_layers: cannot be true here: {blocker}; set it to auto or false")
        return None
    import psutil

    model = trainer.model
    hidden = model.config.backbone_config.hidden_size
    estimate = train_tokens * hidden * 4  # float32 residual stream (bf16 autocast keeps it in float32)
    budget = int(MEMORY_SHARE * psutil.virtual_memory().available)
    print(
        f"cache_frozen_layers: the states below the top {config.trainable_top_layers} layers are cached after "
        f"epoch 1 ({estimate / 2**30:.2f} GiB of {budget / 2**30:.1f} GiB allowed; rows beyond it run in full)"
    )
    return FrozenTrunkCache(model, config.trainable_top_layers, budget)


class FrozenTrunkCache:
    """Forward hooks on a ``LenVMModel`` that record and replay the input of its first trainable layer."""

    def __init__(self, lenvm: nn.Module, num_trainable: int, max_bytes: int):
        self.backbone = lenvm.backbone
        self.all_layers = self.backbone.layers
        self.top_layers = nn.ModuleList(list(self.all_layers)[-num_trainable:])
        self.max_bytes, self.bytes = max_bytes, 0
        self.rows: dict[bytes, torch.Tensor] = {}
        self.record = self.replay = None  # this forward's (keys, lengths) to record, or the states to put in
        self.verified, self.enabled = False, True
        self.hits = 0  # training batches that skipped the frozen layers
        self.handles = [
            lenvm.register_forward_pre_hook(self._before, with_kwargs=True),
            lenvm.register_forward_hook(self._after, always_call=True),
            self.top_layers[0].register_forward_pre_hook(self._at_first_trainable, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _before(self, module, args, kwargs):
        input_ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if not (self.enabled and module.training and torch.is_grad_enabled()) or input_ids is None or mask is None:
            return None
        lengths = mask.sum(1, keepdim=True)
        if not bool((mask.bool() == (torch.arange(mask.size(1), device=mask.device) < lengths)).all()):
            return None  # not right-padded: positions would shift, so the states would not be the same
        lengths = lengths.squeeze(1).tolist()
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        if not all(key in self.rows for key in keys):
            self.record = (keys, lengths)
            return None
        first = self.rows[keys[0]]
        states = first.new_zeros(len(keys), mask.size(1), first.size(-1))
        for i, (key, n) in enumerate(zip(keys, lengths)):
            states[i, :n] = self.rows[key]
        states = states.to(input_ids.device)
        if not self.verified and not self._shortcut_matches(input_ids, mask, states):
            return None
        self.replay, self.backbone.layers = states, self.top_layers
        return None

    def _shortcut_matches(self, input_ids, mask, states) -> bool:
        """Run the first replayed batch both ways once; a mismatch turns the cache off (this batch runs in full)."""
        self.verified = True
        with torch.no_grad():
            full = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            self.replay, self.backbone.layers = states, self.top_layers
            try:
                cached = self.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
            finally:
                self.replay, self.backbone.layers = None, self.all_layers
        real = mask.bool()
        full, cached = full[real].float(), cached[real].float()
        error = float((full - cached).norm() / full.norm().clamp(min=1e-12))
        if error > TOLERANCE:
            self.enabled = False
            self.rows.clear()
            print(f"cache_frozen_layers: off, the shortcut's states differ from the full forward's ({error:.3f})")
        return self.enabled

    def _at_first_trainable(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.replay is not None:
            hidden = self.replay  # the recorded dtype: what the first trainable layer saw in the full forward
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        if self.record is not None:
            for i, (key, n) in enumerate(zip(*self.record)):
                size = n * hidden.size(-1) * hidden.element_size()
                if key not in self.rows and self.bytes + size <= self.max_bytes:
                    self.rows[key] = hidden[i, :n].detach().to("cpu", copy=True)
                    self.bytes += size
            self.record = None
        return None

    def _after(self, module, args, output):
        self.hits += self.replay is not None
        self.backbone.layers = self.all_layers
        self.record = self.replay = None
        return None
