"""LenVM-guided decoding inside vLLM: a V1 logits processor with the choices of ``LenVMGuidedLogitsProcessor``.

The engine is given the LenVM and the processor; each request asks for guidance through ``SamplingParams.extra_args``:

    LLM(model, logits_processors=[LenVMVLLMLogitsProcessor], additional_config={"lenvm_model_path": path})
    vllm serve model --logits-processors lenvm_rl.vllm_guidance:LenVMVLLMLogitsProcessor \\
        --additional-config '{"lenvm_model_path": "path"}'
    SamplingParams(..., extra_args={"lenvm_budget": 64, "lenvm_kind": "exact", "lenvm_mode": "score", ...})

(``guidance_args`` writes them; besides ``lenvm_budget`` and ``lenvm_kind`` the keys are ``lenvm_`` + ``mode``,
``top_k``, ``top_p``, ``min_p``, ``beta``, ``floor``, with ``LenVMGuidedLogitsProcessor``'s defaults; flat, as
``vllm serve`` takes them in a request's ``vllm_xargs``.) Requests without ``lenvm_budget`` are sampled as usual.

vLLM runs the processor in its engine process on the logits of the whole persistent batch, before the temperature
and the request's top-k / top-p, as ``transformers`` runs custom processors: the scoring is the HF processor's
(``decoding.top_candidates``, ``lenvm_step``, ``guided_log_probs``), so greedy decoding picks what it picks.
The LenVM (``additional_config``: ``lenvm_model_path``, ``lenvm_dtype`` default float32) is loaded by the processor
on vLLM's device and keeps one KV cache for the batch, a row per batch slot: a request's row is filled by one
prefill forward of its prompt when it joins (and of its output so far after a preemption), follows vLLM's moves and
swaps of slots, and grows by the accepted token at every step, as in the HF processor; each step is one forward of
(rows, 1 + K) tokens over the guided rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lenvm_rl.decoding import GUIDANCE_MODES, guided_log_probs, lenvm_step, top_candidates
from rewards.scores import budget_kind_codes

try:  # vLLM is optional: without it the module loads (doctests, docs) but the processor cannot be registered
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # pragma: no cover - exercised where vLLM is absent
    BatchUpdate = MoveDirectionality = None
    LogitsProcessor = object

PREFIX = "lenvm_"  # extra_args keys: lenvm_budget, lenvm_kind, lenvm_mode, ... (flat: `vllm serve` takes no dicts)
PROCESSOR_NAME = "lenvm_rl.vllm_guidance:LenVMVLLMLogitsProcessor"  # for `vllm serve --logits-processors`
DEFAULTS = {"mode": "select", "top_k": 8, "top_p": 1.0, "min_p": 0.0, "beta": 0.0, "floor": 0.0}


def guidance_args(budget: float, kind: str, **settings) -> dict:
    """``SamplingParams.extra_args`` that ask for LenVM guidance towards ``budget`` tokens of ``kind``."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"guidance_args: unknown setting {sorted(unknown)[0]!r}; use {', '.join(DEFAULTS)}")
    return {f"{PREFIX}{k}": v for k, v in {"budget": float(budget), "kind": kind, **settings}.items()}


@dataclass
class RequestGuide:
    """One guided request: its budget, settings, token lists (vLLM's live references) and tokens in the cache."""

    budget: float
    kind: int
    mode: str
    top_k: int
    top_p: float
    min_p: float
    beta: float
    floor: float
    eos: tuple[int, ...]  # the ids that end it (EOS and stop tokens): a candidate among them has V = 0
    prompt: list[int]
    output: list[int]  # vLLM appends every accepted token to this list
    cached: int = 0  # tokens of prompt + output in the LenVM's cache

    def settings(self) -> tuple:
        """What rows must share to be guided at once (top-k, top-p and min-p are per row)."""
        return self.mode, self.beta, self.floor, self.eos


def parse_guidance(params) -> dict | None:
    """The request's guidance settings (defaults filled in, typed), None when it asks for none (no ``lenvm_budget``
    in its extra_args); ValueError, naming the key, on bad ones."""
    extra = {k.removeprefix(PREFIX): v for k, v in (params.extra_args or {}).items() if k.startswith(PREFIX)}
    if "budget" not in extra:
        if extra:
            raise ValueError(f"extra_args: {PREFIX}budget is missing beside {sorted(extra)[0]!r} (guidance_args)")
        return None
    unknown = set(extra) - set(DEFAULTS) - {"budget", "kind"}
    if unknown:
        raise ValueError(
            f"extra_args: unknown key {PREFIX}{sorted(unknown)[0]}; use {PREFIX}budget, {PREFIX}kind, "
            + ", ".join(PREFIX + k for k in DEFAULTS)
        )
    if "kind" not in extra:
        raise ValueError(f"extra_args: {PREFIX}kind is missing: exact, at_most or at_least")
    guide = {**DEFAULTS, **extra}
    if guide["mode"] not in GUIDANCE_MODES:
        raise ValueError(f"extra_args: {PREFIX}mode {guide['mode']!r}; use one of {', '.join(GUIDANCE_MODES)}")
    budget_kind_codes([guide["kind"]])  # refuses an unknown kind with the known ones
    guide = {"kind": guide["kind"], "mode": guide["mode"], "top_k": int(guide["top_k"])} | {
        k: float(guide[k]) for k in ("budget", "top_p", "min_p", "beta", "floor")
    }
    if not guide["budget"] > 0:
        raise ValueError(f"extra_args: {PREFIX}budget must be positive, got {guide['budget']}")
    if guide["top_k"] < 1 or not 0 < guide["top_p"] <= 1 or not 0 <= guide["min_p"] < 1:
        raise ValueError(f"extra_args: need {PREFIX}top_k >= 1, top_p in (0, 1], min_p in [0, 1); got {guide}")
    if not 0 <= guide["floor"] <= 1:
        raise ValueError(f"extra_args: {PREFIX}floor must lie in [0, 1], got {guide['floor']}")
    return guide


class LenVMVLLMLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor for LenVM-guided decoding (module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from lenvm_rl.modeling import load_lenvm

        extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
        path = extra.get("lenvm_model_path")
        if path is None:
            raise ValueError(
                "additional_config: LenVMVLLMLogitsProcessor needs lenvm_model_path, e.g. "
                'LLM(..., additional_config={"lenvm_model_path": "runs/lenvm"})'
            )
        dtype = getattr(torch, extra.get("lenvm_dtype", "float32"))
        self.lenvm = load_lenvm(path, dtype=dtype).to(device).eval()
        self.gamma = self.lenvm.config.gamma
        self.device = device
        self.requests: dict[int, RequestGuide] = {}  # batch slot -> guided request
        self.cache = None  # the LenVM's DynamicCache, one row per slot
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (slots, width) 1 where a real token is cached
        self.forward_seconds, self.scored_tokens = 0.0, 0  # guidance's cost, as the HF processor counts it

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_guidance(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding takes

    # ------------------------------------------------------------------ the batch: slots added, removed, moved

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        touched = [*batch_update.removed, *(a[0] for a in batch_update.added)]
        touched += [i for a, b, _ in batch_update.moved for i in (a, b)]
        self.resize(max([batch_update.batch_size, *(i + 1 for i in touched)]))  # moves may come from past the end
        for index in batch_update.removed:
            self.requests.pop(index, None)
            self.mask[index] = 0
        for index, params, prompt, output in batch_update.added:
            self.mask[index] = 0  # a new request's slot holds nothing of it yet
            guide = parse_guidance(params)
            if guide is None:
                self.requests.pop(index, None)
                continue
            if prompt is None:
                raise ValueError("extra_args: LenVM guidance needs the prompt's token ids (not embeddings)")
            self.requests[index] = RequestGuide(
                budget=float(guide.pop("budget")),
                kind=int(budget_kind_codes([guide.pop("kind")])[0]),
                **guide,
                eos=tuple(sorted(params.all_stop_token_ids)),
                prompt=prompt,
                output=output,
            )
        for a, b, direction in batch_update.moved:
            self.move(a, b, direction == MoveDirectionality.SWAP)
        self.resize(batch_update.batch_size)

    def layers(self):
        return [] if self.cache is None else self.cache.layers

    def resize(self, slots: int) -> None:
        """Keep ``slots`` rows in the cache and mask (new ones empty)."""
        extra = slots - self.mask.size(0)
        if extra > 0:
            self.mask = torch.cat([self.mask, self.mask.new_zeros(extra, self.mask.size(1))])
            for layer in self.layers():
                layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(extra, *layer.keys.shape[1:])])
                layer.values = torch.cat([layer.values, layer.values.new_zeros(extra, *layer.values.shape[1:])])
        elif extra < 0:
            self.mask = self.mask[:slots]
            for layer in self.layers():
                layer.keys, layer.values = layer.keys[:slots], layer.values[:slots]

    def move(self, a: int, b: int, swap: bool) -> None:
        """vLLM moved slot a to b (a one-way move leaves a empty) or swapped them: so do the cache rows."""
        guide_a, guide_b = self.requests.pop(a, None), self.requests.pop(b, None)
        if guide_a is not None:
            self.requests[b] = guide_a
        if swap and guide_b is not None:
            self.requests[a] = guide_b
        order = torch.tensor([b, a] if swap else [a], device=self.device)
        target = torch.tensor([a, b] if swap else [b], device=self.device)
        for tensor in [self.mask, *(t for layer in self.layers() for t in (layer.keys, layer.values))]:
            tensor[target] = tensor[order]  # advanced indexing copies the source rows first
        if not swap:
            self.mask[a] = 0

    # ------------------------------------------------------------------ one step

    def widen(self, width: int) -> None:
        """Left-pad every row of the cache to at least ``width`` positions (masked)."""
        extra = width - self.mask.size(1)
        if extra <= 0:
            return
        self.mask = torch.cat([self.mask.new_zeros(self.mask.size(0), extra), self.mask], dim=1)
        for layer in self.layers():
            shape = (*layer.keys.shape[:2], extra, layer.keys.size(3))
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=2)
            layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=2)

    def prefill(self, slots: list[int]) -> None:
        """Put the tokens of ``slots`` that are not cached but the last (prompt, output after a preemption) into their
        rows, through one left-padded forward of those rows alone."""
        pending = [(self.requests[s].prompt + self.requests[s].output)[:-1] for s in slots]
        width = max(map(len, pending))
        new = torch.tensor([[0] * (width - len(p)) + p for p in pending], device=self.device)
        new_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pending], device=self.device)
        _, cache, mask = lenvm_step(
            self.lenvm, None, new_mask[:, :0], new, new_mask, new.new_zeros(len(slots), 0)
        )  # (r, H, width, D) per layer
        self.start_cache(cache)
        self.widen(width)
        rows = torch.tensor(slots, device=self.device)
        self.mask[rows] = 0
        self.mask[rows, -width:] = mask
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys[rows] = 0
            mine.values[rows] = 0
            mine.keys[rows, :, -width:] = theirs.keys
            mine.values[rows, :, -width:] = theirs.values
        for s, p in zip(slots, pending):
            self.requests[s].cached = len(p)

    def start_cache(self, like) -> None:
        """The batch's cache, empty (masked) at the current width, shaped like ``like`` (the first forward's)."""
        from transformers import DynamicCache

        if self.cache is not None:
            return
        shape = lambda t: (self.mask.size(0), t.size(1), self.mask.size(1), t.size(3))
        self.cache = DynamicCache(
            ddp_cache_data=[(l.keys.new_zeros(shape(l.keys)), l.values.new_zeros(shape(l.values))) for l in like.layers]
        )

    def trim(self) -> None:
        """Drop the leading positions no row holds a token at (left by finished long prompts)."""
        held = self.mask.any(0).nonzero()
        first = int(held[0]) if len(held) else self.mask.size(1)
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.layers():
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    @torch.no_grad()
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        slots = sorted(s for s in self.requests if s < logits.size(0))
        if not slots:
            return logits
        start = time.perf_counter()
        joined = [
            s
            for s in slots
            if len(self.requests[s].prompt) + len(self.requests[s].output) - self.requests[s].cached > 1
        ]
        if joined:
            self.prefill(joined)
        self.trim()
        guides = [self.requests[s] for s in slots]
        rows = torch.tensor(slots, device=self.device)
        everyone = slots == list(range(self.mask.size(0)))
        # The token each row accepted since the last step: the last of its prompt on the step after its prefill;
        # none (a masked pad) where vLLM samples a row again without its having accepted a token (chunked prefill).
        new_ids = [(g.prompt + g.output)[g.cached :] for g in guides]
        new = torch.tensor([ids[-1:] or [0] for ids in new_ids], device=self.device)
        new_mask = torch.tensor([[len(ids)] for ids in new_ids], device=self.device).clamp(max=1)
        per_row = lambda name: torch.tensor([[getattr(g, name)] for g in guides], device=logits.device)  # (R, 1)
        log_probs, top_log_probs, candidates, keep = top_candidates(
            logits[rows], per_row("top_k"), per_row("top_p"), per_row("min_p")
        )
        cache = self.cache if everyone else self.select(rows)
        values, cache, mask = lenvm_step(self.lenvm, cache, self.mask[rows], new, new_mask, candidates.to(self.device))
        self.store(rows, cache, mask, everyone)
        for g, ids in zip(guides, new_ids):
            g.cached += len(ids)
        self.scored_tokens += len(slots) * (1 + candidates.size(1))

        steps = torch.tensor([len(g.output) for g in guides], dtype=torch.float64, device=logits.device)
        budgets = torch.tensor([g.budget for g in guides], dtype=torch.float64, device=logits.device)
        kinds = torch.tensor([g.kind for g in guides], device=logits.device)
        guided = torch.empty_like(log_probs)
        for settings in {g.settings() for g in guides}:  # the rows that share their settings, at once
            part = torch.tensor([g.settings() == settings for g in guides], device=logits.device)
            mode, beta, floor, eos = settings
            guided[part] = guided_log_probs(
                log_probs[part],
                top_log_probs[part],
                candidates[part],
                keep[part],
                values[part],
                torch.tensor(eos, dtype=torch.long, device=logits.device),
                steps[part],
                budgets[part],
                kinds[part],
                GroupSettings(mode, beta, floor, self.gamma),
            )
        logits[rows] = guided.to(logits.dtype)
        self.forward_seconds += time.perf_counter() - start
        return logits

    def select(self, rows: torch.Tensor):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(layer.keys[rows], layer.values[rows]) for layer in self.layers()])

    def store(self, rows: torch.Tensor, cache, mask: torch.Tensor, everyone: bool) -> None:
        """Take the step's cache (the guided rows, one position longer) back into the batch's."""
        if everyone:
            self.cache, self.mask = cache, mask
            return
        self.start_cache(cache)
        self.mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.size(0), 1)], dim=1)
        self.mask[rows] = mask
        for mine, theirs in zip(self.layers(), cache.layers):
            shape = (*mine.keys.shape[:2], 1, mine.keys.size(3))
            mine.keys = torch.cat([mine.keys, mine.keys.new_zeros(shape)], dim=2)
            mine.values = torch.cat([mine.values, mine.values.new_zeros(shape)], dim=2)
            mine.keys[rows], mine.values[rows] = theirs.keys, theirs.values


@dataclass
class GroupSettings:
    """What ``decoding.guided_log_probs`` reads of a processor, for rows that share their settings."""

    mode: str
    beta: float
    floor: float
    gamma: float
