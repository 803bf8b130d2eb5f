"""LenVM-guided decoding: the cached candidate values equal a plain recompute, the selection rules pick the
candidate a hand computation picks (with a LenVM whose values are known), tilting matches its formula, and
the processor drives a real `generate` towards the budget."""

import math

import pytest
import torch
from conftest import make_tiny_llama, tiny_llama_config

from lenvm_rl.decoding import LenVMGuidedLogitsProcessor
from lenvm_rl.modeling import LenVMModel
from lenvm_rl.returns import remaining_from_value, value_from_remaining

GAMMA = 0.8


@pytest.fixture(scope="module")
def random_lenvm(tokenizer):
    torch.manual_seed(5)
    model = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=GAMMA).eval()
    with torch.no_grad():  # a head whose values vary with the prefix
        model.head.out.weight.normal_(std=1.0)
    return model


def known_value_lenvm(tokenizer, logits_by_token: torch.Tensor) -> LenVMModel:
    """A LenVM whose V(state) = -sigmoid(logits_by_token[last token of the state]), whatever came before.

    The layers write nothing into the residual stream, token i embeds as a one-hot vector, the final
    RMSNorm scales it to sqrt(H), and the head reads coordinate i.
    """
    vocab = len(tokenizer)
    hidden = vocab + 2 - vocab % 2  # room for every token, and even (RoPE)
    config = tiny_llama_config(vocab, hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=hidden)
    from transformers import LlamaForCausalLM

    backbone = LlamaForCausalLM(config)
    model = LenVMModel.from_backbone(backbone, gamma=GAMMA, head_hidden_size=hidden).eval()
    with torch.no_grad():
        model.backbone.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        for layer in model.backbone.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.backbone.norm.weight.fill_(1.0)
        scale = torch.nn.functional.silu(torch.tensor(math.sqrt(hidden))).item()
        model.head.dense.weight.copy_(torch.eye(hidden))
        model.head.dense.bias.zero_()
        model.head.out.weight.zero_()
        model.head.out.weight[0, :vocab] = logits_by_token / scale
        model.head.out.bias.zero_()
    return model


def test_cached_candidate_values_equal_a_plain_recompute(random_lenvm, tokenizer):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # different lengths: the second is left-padded
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    processor = LenVMGuidedLogitsProcessor(
        random_lenvm, [6, 6], ["exact", "exact"], [5, 3], [tokenizer.eos_token_id], top_k=4
    )
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    generated = [[20, 21, 22], [30, 31, 32]]
    for step in range(3):
        candidates = torch.tensor([[40, 41, 42, 43], [44, 45, 46, 47]])
        cached = processor.candidate_values(input_ids, candidates)  # (2, 4)
        for row, prompt in enumerate(prompts):
            for k in range(4):
                sequence = torch.tensor([prompt + generated[row][:step] + [candidates[row, k].item()]])
                expected = random_lenvm(input_ids=sequence).length_values[0, -1].double()
                assert cached[row, k].item() == pytest.approx(expected.item(), abs=1e-5)
        input_ids = torch.cat([input_ids, torch.tensor([[generated[0][step]], [generated[1][step]]])], dim=1)
    assert processor.forward_calls == 3  # one LenVM forward per step


def candidate_logits(vocab, favourites):
    """Logits where ``favourites`` (in order) are the most probable tokens and all others are far below."""
    scores = torch.full((vocab,), -20.0)
    for rank, token in enumerate(favourites):
        scores[token] = 5.0 - rank
    return scores


@pytest.mark.parametrize(
    ("kind", "budget", "steps", "expected"),
    [
        # V of the four candidates (tokens 40..43): -sigmoid(2), -sigmoid(0), -sigmoid(-2) and EOS (V = 0).
        ("exact", 10, 0, None),  # computed below: argmin |V - v*| with v* for 9 tokens left
        ("exact", 3, 3, "eos"),  # budget reached: stopping now has v* = 0 = V(EOS)
        ("at_most", 3, 2, "shortest"),  # every non-EOS candidate overshoots: argmax V, here EOS
        ("at_most", 100, 0, "first"),  # everything fits: the most probable candidate
        ("at_least", 100, 0, "longest"),  # nothing reaches 100: argmin V
        ("at_least", 2, 5, "first"),  # already long enough: the most probable candidate
    ],
)
def test_selection_rules_pick_the_hand_computed_candidate(tokenizer, kind, budget, steps, expected):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    logits = torch.zeros(vocab)
    logits[40], logits[41], logits[42] = 2.0, 0.0, -2.0
    lenvm = known_value_lenvm(tokenizer, logits)
    favourites = [41, eos, 40, 42]  # probability order
    processor = LenVMGuidedLogitsProcessor(lenvm, [budget], [kind], [4], [eos], top_k=4)
    input_ids = torch.tensor([[5, 6, 7, 8] + [9] * steps])
    out = processor(input_ids, candidate_logits(vocab, favourites)[None])
    chosen = out[0].argmax().item()
    assert torch.isinf(out[0]).sum() == vocab - 1  # exactly one token left
    values = {
        40: -torch.sigmoid(torch.tensor(2.0)).item(),
        41: -0.5,
        42: -torch.sigmoid(torch.tensor(-2.0)).item(),
        eos: 0.0,
    }
    if expected is None:  # exact, t = 0: a token leaves budget - 1 tokens, EOS leaves budget
        target = {tok: value_from_remaining(torch.tensor(float(budget - (tok != eos))), GAMMA).item() for tok in values}
        expected_token = min(values, key=lambda tok: abs(values[tok] - target[tok]))
    else:
        expected_token = {
            "eos": eos,
            "shortest": max(values, key=values.get),
            "first": favourites[0],
            "longest": min(values, key=values.get),
        }[expected]
    assert chosen == expected_token


def test_tilting_matches_its_formula(tokenizer):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    logits = torch.zeros(vocab)
    logits[40], logits[41] = 2.0, -1.0
    lenvm = known_value_lenvm(tokenizer, logits)
    scores = candidate_logits(vocab, [40, 41, eos])
    beta = 3.0
    processor = LenVMGuidedLogitsProcessor(lenvm, [8], ["exact"], [2], [eos], mode="tilt", beta=beta, top_k=3)
    out = processor(torch.tensor([[5, 6]]), scores[None])[0]
    log_p = scores.log_softmax(-1)
    values = {40: -torch.sigmoid(torch.tensor(2.0)), 41: -torch.sigmoid(torch.tensor(-1.0)), eos: torch.tensor(0.0)}
    expected = torch.tensor([log_p[t] + beta * values[t] for t in (40, 41, eos)]).softmax(-1)
    assert out[[40, 41, eos]].softmax(-1).tolist() == pytest.approx(
        expected.tolist(), abs=1e-4
    )  # the head reads RMSNorm output (eps)
    assert torch.isinf(out).sum() == vocab - 3


def test_top_p_and_min_p_restrict_the_candidates(tokenizer):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    lenvm = known_value_lenvm(tokenizer, torch.zeros(vocab))
    scores = candidate_logits(vocab, [40, 41, 42, 43])
    for options, allowed in [(dict(top_p=0.5), 1), (dict(min_p=0.3), 2), (dict(), 4)]:
        processor = LenVMGuidedLogitsProcessor(lenvm, [8], ["exact"], [2], [eos], mode="tilt", top_k=4, **options)
        assert (~torch.isinf(processor(torch.tensor([[5, 6]]), scores[None])[0])).sum() == allowed


def test_guided_generate_follows_the_lenvm(tiny_model_path, tokenizer):
    """Inside a real sampled `generate`: with V = -0.5 (3.1 tokens left) after every token and an exact budget
    of 2, at t = 0 a token is nearer its target (|-0.5 - (-(1 - 0.8))| = 0.3) than EOS (|0 - (-(1 - 0.8^2))| =
    0.36); at t = 1 EOS (|0 - (-0.2)| = 0.2) beats a token (|-0.5 - 0| = 0.5). Every completion has 1 token."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    eos = tokenizer.eos_token_id
    lenvm = known_value_lenvm(tokenizer, torch.zeros(len(tokenizer)))
    prompt = tokenizer("<user>2+2?<assistant>", add_special_tokens=False)["input_ids"]
    processor = LenVMGuidedLogitsProcessor(
        lenvm, [2] * 4, ["exact"] * 4, [len(prompt)] * 4, [eos], top_k=len(tokenizer)
    )
    torch.manual_seed(0)
    output = policy.generate(
        input_ids=torch.tensor([prompt] * 4),
        attention_mask=torch.ones(4, len(prompt), dtype=torch.long),
        do_sample=True,
        max_new_tokens=12,
        logits_processor=LogitsProcessorList([processor]),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
    )
    assert remaining_from_value(torch.tensor(-0.5), GAMMA).item() == pytest.approx(3.106, abs=1e-3)
    assert (output[:, len(prompt) + 1] == eos).all() and (output[:, len(prompt)] != eos).all()
