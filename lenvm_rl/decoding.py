"""LenVM-guided decoding (paper §4.2–4.3) as a ``transformers`` LogitsProcessor.

At every step the processor keeps the policy's plausible next tokens (top-k, then top-p and min-p
on the softmax of the step's logits), scores the state each candidate would lead to with the LenVM, and
rewrites the logits:

- ``mode="select"``: one candidate is kept per row (all other logits become -inf), by the row's
  budget kind. exact: argmin |V(x) − v*|, with v* = −(1 − γ^r) the value of the budget left after the
  action (r = N − t − 1 for a token, N − t for EOS, floored at 0; t = tokens so far). at_most: the
  most probable candidate whose predicted total length t + 1 + ln(1 + V(x))/ln γ (t for EOS) is ≤ N,
  and argmax V (the shortest continuation) when none is; at_least: the most probable candidate with
  predicted total ≥ N, else argmin V. When the budget is at risk these are the paper's rules
  (at_most argmax V, at_least argmin V); otherwise the policy keeps its own choice.
- ``mode="tilt"``: p'(x) ∝ p(x) · exp(β V(x)) over the candidates (others -inf). With V ∈ (−1, 0],
  β > 0 favours shorter continuations and β < 0 longer ones, whatever the budget.
- ``mode="score"``: p'(x) ∝ p(x) · S(t + 1 + n̂(x), N)^β over the candidates, S the LIFEBench length score of
  the row's budget kind at the predicted total length (t for EOS): a soft, budget-aware ``select`` that keeps
  the policy's preferences among candidates predicted to score alike; β → ∞ keeps the best-scoring ones only.

``floor`` ε > 0 mixes the result with the policy: μ = (1 − ε) p' + ε p over the whole vocabulary
(``advantages.floored_log_probs``), so every token the policy can emit stays reachable and p / μ <= 1 / ε:
the support rule that lets RL correct guided samples with importance weights (``lenvm_rl.guided_sampling``).

An EOS candidate leads to the terminal state, whose value is 0 without a forward pass. The LenVM
keeps its own KV cache of the accepted prefix: each step runs one forward of (B, 1 + K) tokens (the
token accepted at the previous step and the K candidates), where a custom 4D attention mask lets
every candidate see the prefix and itself only; the cache is then cropped back to the prefix. Custom
processors run before transformers' temperature / top-p warpers, so a selected token is sampled with
probability 1, and tilted logits are then scaled by the temperature.

Why by hand: no maintained library scores next-token candidates with a separate value model.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import LogitsProcessor

from lenvm_rl.advantages import floored_log_probs
from lenvm_rl.returns import remaining_from_value, value_from_remaining
from rewards.scores import budget_kind_codes, lifebench_length_score

GUIDANCE_MODES = ("select", "tilt", "score")


class LenVMGuidedLogitsProcessor(LogitsProcessor):
    """Steer generation towards each row's token budget with a LenVM (see the module docstring).

    ``budgets`` (R,) tokens, ``kinds`` (R,) budget kinds (names or codes), ``prompt_lengths`` (R,) the
    unpadded prompt lengths; R counts returned sequences (prompts × num_return_sequences, in
    ``generate``'s order). Prompts must be left-padded, as for any decoder-only ``generate``. One
    processor serves one ``generate`` call.
    """

    def __init__(
        self,
        lenvm,
        budgets,
        kinds,
        prompt_lengths,
        eos_token_ids,
        mode: str = "select",
        top_k: int = 8,
        top_p: float = 1.0,
        min_p: float = 0.0,
        beta: float = 0.0,
        gamma: float | None = None,
        floor: float = 0.0,
    ):
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"mode: {mode!r} is not a guidance mode; use one of {', '.join(GUIDANCE_MODES)}")
        if top_k < 1 or not 0.0 < top_p <= 1.0 or not 0.0 <= min_p < 1.0:
            raise ValueError(f"top_k >= 1, top_p in (0, 1], min_p in [0, 1) needed; got {top_k}, {top_p}, {min_p}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor: must lie in [0, 1], got {floor}")
        self.floor = floor
        self.lenvm, self.mode, self.top_k, self.top_p, self.min_p, self.beta = lenvm, mode, top_k, top_p, min_p, beta
        self.gamma = gamma or lenvm.config.gamma
        device = next(lenvm.parameters()).device
        self.budgets = torch.as_tensor(budgets, dtype=torch.float64, device=device)  # (R,)
        codes = kinds if isinstance(kinds, torch.Tensor) else budget_kind_codes(list(kinds))
        self.kinds = codes.to(device)  # (R,)
        self.prompt_lengths = torch.as_tensor(prompt_lengths, device=device)  # (R,)
        self.eos_ids = torch.tensor(sorted(eos_token_ids), device=device)
        self.cache = None
        self.key_mask = None  # (R, past) 1 where the cached position is a real token
        self.prompt_width = int(self.prompt_lengths.max())  # prompts are left-padded to the longest
        self.forward_calls = 0
        self.scored_tokens = 0  # tokens through the LenVM (accepted + candidates): guidance's cost
        self.forward_seconds = 0.0

    @torch.no_grad()
    def candidate_values(self, input_ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """V of the state each candidate leads to (R, K), through the LenVM's prefix cache."""
        start = time.perf_counter()
        rows = candidates.size(0)
        if self.cache is None:  # first call: everything so far (the prompts) is new
            new = input_ids
            pads = self.prompt_width - self.prompt_lengths  # (R,)
            new_mask = (torch.arange(new.size(1), device=new.device) >= pads[:, None]).long()  # (R, W + t)
            self.key_mask = new_mask.new_zeros(rows, 0)
        else:
            new = input_ids[:, -1:]  # the token accepted at the previous step
            new_mask = torch.ones_like(new)
        values, self.cache, self.key_mask = lenvm_step(self.lenvm, self.cache, self.key_mask, new, new_mask, candidates)
        self.forward_calls += 1
        self.scored_tokens += rows * (new.size(1) + candidates.size(1))
        self.forward_seconds += time.perf_counter() - start
        return values

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = scores.size(0)
        if rows != self.budgets.numel():
            raise ValueError(f"budgets: the processor was built for {self.budgets.numel()} rows, generate gave {rows}")
        log_probs, top_log_probs, candidates, keep = top_candidates(scores, self.top_k, self.top_p, self.min_p)
        values = self.candidate_values(input_ids, candidates.to(input_ids.device))  # (R, K')
        steps = torch.full_like(self.budgets, float(input_ids.size(1) - self.prompt_width))  # t, tokens so far
        guided = guided_log_probs(
            log_probs, top_log_probs, candidates, keep, values, self.eos_ids, steps, self.budgets, self.kinds, self
        )
        return guided.to(scores.dtype)


def top_candidates(scores: torch.Tensor, top_k, top_p=1.0, min_p=0.0) -> tuple[torch.Tensor, ...]:
    """The policy's log-probs (R, V) and its plausible next tokens: the top-k, then top-p and min-p (relative to the
    most probable token) among them; each a number or an (R, 1) tensor of per-row settings. Returns the log-probs, the
    candidates' log-probs and ids (R, K') most probable first, and ``keep`` (R, K'), which of them pass, a prefix of
    each row; K' <= K is the longest such prefix, so the LenVM scores no candidate that no row keeps (exactly as if
    all K were scored: the others get no probability)."""
    log_probs = scores.float().log_softmax(-1)  # (R, V)
    top_log_probs, candidates = log_probs.topk(min(int(torch.as_tensor(top_k).max()), scores.size(-1)), dim=-1)
    probs = top_log_probs.exp()  # (R, K), descending
    keep = probs >= min_p * probs[:, :1]  # min-p
    keep &= (probs.cumsum(-1) - probs) < top_p  # top-p: the smallest prefix reaching top_p
    keep &= torch.arange(probs.size(1), device=probs.device) < torch.as_tensor(top_k, device=probs.device)
    keep[:, 0] = True
    width = int(keep.sum(1).max())
    return log_probs, top_log_probs[:, :width], candidates[:, :width], keep[:, :width]


def guided_log_probs(
    log_probs, top_log_probs, candidates, keep, values, eos_ids, steps, budgets, kinds, settings
) -> torch.Tensor:
    """The guided log-probs (R, V) of the module docstring, shared by the ``transformers`` processor and vLLM's
    (``lenvm_rl.vllm_guidance``): ``top_candidates``' candidates and ``keep``, ``values`` (R, K) V of each
    candidate's state, ``steps`` (R,) tokens generated so far, ``budgets`` / ``kinds`` (R,), and ``settings`` with
    ``mode``, ``beta``, ``gamma``, ``floor`` (a processor)."""
    is_eos = torch.isin(candidates, eos_ids.to(candidates.device))
    values = torch.where(is_eos, 0.0, values.double())  # the terminal state's value
    budgets, kinds = budgets[:, None].double(), kinds[:, None]  # (R, 1)
    after = steps[:, None].double() + (~is_eos).double()  # tokens in the completion once the candidate is taken
    predicted_total = after + remaining_from_value(values, settings.gamma).double()  # (R, K)
    if settings.mode == "select":
        target = value_from_remaining((budgets - after).clamp(min=0), settings.gamma).double()  # v*
        rank = torch.arange(candidates.size(1), device=candidates.device).double().expand_as(values)  # 0: likeliest
        exact = (values - target).abs()
        at_most = torch.where(predicted_total <= budgets, rank - 1e6, -values)  # fits: most probable; else argmax V
        at_least = torch.where(predicted_total >= budgets, rank - 1e6, values)  # long enough: likeliest; else argmin V
        cost = torch.where(kinds == 0, exact, torch.where(kinds == 1, at_most, at_least))
        chosen = torch.where(keep, cost, math.inf).argmin(1, keepdim=True)  # (R, 1)
        choice = torch.full_like(values, -math.inf).scatter(1, chosen, 0.0)  # log q (R, K)
    else:
        if settings.mode == "tilt":
            bonus = settings.beta * values
        else:  # score: β log S at the predicted total length
            score = lifebench_length_score(predicted_total, budgets.expand_as(values), kinds.expand_as(values))
            bonus = settings.beta * score.double().clamp(min=1e-30).log()
        choice = torch.where(keep, top_log_probs.double() + bonus, -math.inf).log_softmax(-1)  # log q (R, K)
    guided = torch.full_like(log_probs, -math.inf).scatter(1, candidates, choice.to(log_probs.dtype))  # (R, V)
    if settings.floor > 0.0:
        guided = floored_log_probs(guided, log_probs, settings.floor)
    return guided


@torch.no_grad()
def lenvm_step(lenvm, cache, past_mask, new, new_mask, candidates):
    """One LenVM forward over each row's new accepted tokens and K candidates, through its prefix cache.

    ``cache`` holds ``past_mask.size(1)`` positions per row (``past_mask`` (R, past): 1 where a real token is
    cached; None with past 0); ``new`` (R, n) the tokens accepted since, left-padded (``new_mask`` 0 on pads);
    ``candidates`` (R, K), K >= 0. A custom 4D attention mask lets every candidate see the prefix and itself only, and
    the candidates are cropped from the cache after. Returns (V (R, K) float64, the cache, the key mask (R, past + n)).
    """
    rows, num_candidates = candidates.shape
    device = candidates.device
    past = past_mask.size(1)
    key_mask = torch.cat([past_mask, new_mask], dim=1)  # (R, past + n) after the accepted tokens
    positions = key_mask.cumsum(1) - 1  # (R, past + n)
    new_positions = positions[:, past:].clamp(min=0)  # (R, n)
    candidate_positions = positions[:, -1:] + 1  # (R, 1)

    n, query = new.size(1), new.size(1) + num_candidates
    dtype = next(lenvm.parameters()).dtype
    allowed = torch.zeros(rows, query, past + query, dtype=torch.bool, device=device)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    allowed[:, :n, : past + n] = key_mask[:, None, :].bool()  # the prefix and the accepted tokens ...
    allowed[:, :n, past : past + n] &= causal  # ... causally among the new ones
    allowed[:, n:, : past + n] = key_mask[:, None, :].bool()  # candidates see all accepted tokens
    allowed[:, n:, past + n :] = torch.eye(num_candidates, dtype=torch.bool, device=device)  # and themselves
    # Every query sees itself (a pad position would otherwise see nothing and give nan).
    diagonal = torch.arange(query, device=device)
    allowed[:, diagonal, past + diagonal] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    output = lenvm(
        input_ids=torch.cat([new, candidates], dim=1),
        attention_mask=mask[:, None],  # (R, 1, query, past + query)
        position_ids=torch.cat([new_positions, candidate_positions.expand(-1, num_candidates)], dim=1),
        cache=cache,
        use_cache=True,
    )
    if num_candidates:
        output.cache.crop(-num_candidates)  # drop the candidates: keep the accepted prefix only
    return output.length_values[:, n:].double(), output.cache, key_mask
