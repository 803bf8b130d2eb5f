"""vLLM's LenVM-guided logits processor against the ``transformers`` one, request by request.

No engine here: vLLM's own ``BatchUpdate``s drive the processor through what its persistent batch does (requests
join at different steps, slots are swapped, a finished request's slot is refilled by a move from the end, a request
without guidance shares the batch), and at every step each guided row's logits must equal what
``LenVMGuidedLogitsProcessor`` gives that request alone. The engine runs it in ``test_vllm.py``.
"""

import importlib.util

import pytest
import torch
from conftest import make_tiny_llama

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (`make test-vllm`)"),
]

EOS = 2


@pytest.fixture(scope="module")
def varied_lenvm_path(tmp_path_factory, tokenizer) -> str:
    """A tiny LenVM whose values vary with the prefix (a random head), saved as `train-lenvm` saves one."""
    from lenvm_rl.modeling import LenVMModel

    torch.manual_seed(5)
    model = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.8).eval()
    with torch.no_grad():
        model.head.out.weight.normal_(std=1.0)
    path = tmp_path_factory.mktemp("varied_lenvm")
    model.save_pretrained(path)
    return str(path)


class Request:
    """A request as the engine holds it, and the HF processor that guides it alone."""

    def __init__(self, lenvm, prompt, guidance):
        from vllm import SamplingParams

        from lenvm_rl.decoding import LenVMGuidedLogitsProcessor
        from lenvm_rl.vllm_guidance import DEFAULTS, guidance_args

        self.prompt, self.output = prompt, []
        extra = guidance_args(**guidance) if guidance else None
        self.params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[EOS], extra_args=extra)
        self.hf = None
        if guidance:
            settings = {**DEFAULTS, **{k: v for k, v in guidance.items() if k not in ("budget", "kind")}}
            self.hf = LenVMGuidedLogitsProcessor(
                lenvm, [guidance["budget"]], [guidance["kind"]], [len(prompt)], {EOS}, **settings
            )

    def added(self, slot):
        return (slot, self.params, self.prompt, self.output)

    def hf_logits(self, scores):
        return self.hf(torch.tensor([self.prompt + self.output]), scores[None])[0]


def test_vllm_processor_equals_the_hf_processor_per_request(varied_lenvm_path, tokenizer):
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from lenvm_rl.modeling import load_lenvm
    from lenvm_rl.vllm_guidance import LenVMVLLMLogitsProcessor

    lenvm = load_lenvm(varied_lenvm_path).eval()
    config = SimpleNamespace(additional_config={"lenvm_model_path": varied_lenvm_path})
    processor = LenVMVLLMLogitsProcessor(config, torch.device("cpu"), False)
    requests = {
        "a": Request(lenvm, [5, 6, 7, 8, 9, 10], dict(budget=6, kind="exact", mode="select", top_k=4, min_p=0.2)),
        "plain": Request(lenvm, [11, 12, 13], None),
        "c": Request(lenvm, [14, 15, 16], dict(budget=5, kind="at_most", mode="score", top_k=5, top_p=0.9, beta=4.0)),
        "d": Request(lenvm, [17, 18, 19, 20], dict(budget=8, kind="at_least", mode="tilt", beta=-2.0, floor=0.1)),
    }
    slots = ["a", "plain", "c"]
    processor.update_state(BatchUpdate(3, [], [requests[n].added(i) for i, n in enumerate(slots)], []))
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    for step in range(7):
        if step == 2:  # d joins mid-generation
            slots.append("d")
            processor.update_state(BatchUpdate(4, [], [requests["d"].added(3)], []))
        if step == 3:  # the engine swaps two slots
            slots[0], slots[2] = slots[2], slots[0]
            processor.update_state(BatchUpdate(4, [], [], [(0, 2, MoveDirectionality.SWAP)]))
        if step == 4:  # the unguided request finishes; the last slot moves into its place
            gone = slots.index("plain")
            slots[gone] = slots.pop()
            processor.update_state(BatchUpdate(3, [gone], [], [(3, gone, MoveDirectionality.UNIDIRECTIONAL)]))
        logits = torch.randn(len(slots), vocab, generator=generator) * 3
        guided = processor.apply(logits.clone())
        for row, name in enumerate(slots):
            request = requests[name]
            if request.hf is None:
                assert torch.equal(guided[row], logits[row])  # an unguided request is left alone
            else:
                expected = request.hf_logits(logits[row])
                assert torch.equal(guided[row].isinf(), expected.isinf()), (step, name)
                finite = expected.isfinite()
                torch.testing.assert_close(guided[row][finite], expected[finite], atol=1e-4, rtol=1e-4)
            token = int(guided[row].argmax())
            request.output.append(token if token != EOS else 3)  # vLLM appends the token to the live list
    assert processor.scored_tokens > 0 and processor.cache is not None
    assert processor.mask.size(0) == 3  # the cache follows the batch's size


def test_guidance_args_are_checked_where_vllm_validates_requests():
    from vllm import SamplingParams

    from lenvm_rl.vllm_guidance import LenVMVLLMLogitsProcessor, guidance_args

    bad = [
        ({"lenvm_budget": 8}, "lenvm_kind is missing"),
        ({"lenvm_kind": "exact"}, "lenvm_budget is missing"),
        ({**guidance_args(8, "exact"), "lenvm_temperature": 1.0}, "unknown key lenvm_temperature"),
        (guidance_args(8, "exact", mode="argmax"), "mode"),
        (guidance_args(0, "exact"), "budget"),
        (guidance_args(8, "roughly"), "roughly"),
        (guidance_args(8, "exact", top_k=0), "top_k"),
    ]
    for extra, needle in bad:
        with pytest.raises(ValueError, match=needle):
            LenVMVLLMLogitsProcessor.validate_params(SamplingParams(extra_args=extra))
    LenVMVLLMLogitsProcessor.validate_params(SamplingParams(extra_args=guidance_args(8, "exact", mode="tilt")))
    with pytest.raises(ValueError, match="lenvm_model_path"):
        from types import SimpleNamespace

        LenVMVLLMLogitsProcessor(SimpleNamespace(additional_config={}), torch.device("cpu"), False)
