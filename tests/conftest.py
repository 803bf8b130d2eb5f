"""Shared fixtures: a char-level tokenizer and a tiny random Llama built in code, never downloaded.

The tiny model is random, but it is made to stop: residual dimension 0 carries a constant that no
layer writes to, and the EOS row of the LM head reads it, so every step emits EOS with probability
``EOS_PROBABILITY`` (the other logits are near zero). Rollouts of 8 tokens then mix finished and
truncated completions, which is what the LenVM code paths need.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
# Scripts the multiprocess tests launch: importing one runs it, so --doctest-modules must not collect them.
collect_ignore_glob = ["mp_*.py"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
EOS_PROBABILITY = 0.15
OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No test touches the network or the user's cache."""
    patch = pytest.MonkeyPatch()
    for name, value in {**OFFLINE_ENV, "LENVM_RL_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
        patch.setenv(name, value)
    yield
    patch.undo()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (about 100 tokens), plus <unk>, <pad> and <eos>."""
    specials = ["<unk>", "<pad>", "<eos>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", chat_template=CHAT_TEMPLATE
    )


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def make_tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A random tiny Llama whose every step emits EOS with probability about ``EOS_PROBABILITY``."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:  # nothing writes to residual dimension 0
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[:, 0] = 0.0
        # After the final RMSNorm dimension 0 is about sqrt(hidden_size); the rest is near 0.
        eos_logit = math.log(EOS_PROBABILITY * (len(tokenizer) - 1) / (1 - EOS_PROBABILITY))
        model.lm_head.weight[tokenizer.eos_token_id, 0] = eos_logit / math.sqrt(config.hidden_size)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer) -> str:
    """A folder that ``load_causal_lm`` / ``load_tokenizer`` and the CLI load like any model path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def rollout_args(output_dir, **overrides):
    from lenvm_rl.rollout import RolloutArguments

    settings = dict(
        output_dir=str(output_dir),
        dataset_name="arithmetic",
        num_prompts=6,
        shard_size=2,
        num_samples_per_prompt=2,
        max_completion_tokens=8,
        prompts_per_batch=2,
        temperature=1.0,
        seed=0,
    )
    return RolloutArguments(**{**settings, **overrides})


@pytest.fixture(scope="session")
def make_rollouts(tiny_model_path, tmp_path_factory):
    """``make_rollouts(**overrides) -> folder``: the real ``run_rollouts`` on the tiny model, in a new folder."""
    from lenvm_rl.rollout import run_rollouts

    def make(**overrides):
        return run_rollouts(rollout_args(tmp_path_factory.mktemp("rollouts"), **overrides), tiny_model_path)

    return make


@pytest.fixture(scope="session")
def rollouts_dir(make_rollouts) -> Path:
    """12 rollouts (6 prompts x 2 samples, at most 8 tokens), finished and truncated ones."""
    return make_rollouts(num_prompts=6)


def write_rollout_shard(output_dir, rows: list[dict]) -> Path:
    """A rollout folder written by hand (one shard), for sets ``run_rollouts`` would not produce."""
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(Path(output_dir) / "shards" / "shard-00000"))
    return Path(output_dir)


@pytest.fixture
def stand_in_vllm(monkeypatch, tokenizer):
    """vLLM is not in the default suite (`make test-vllm` runs it for real): a stand-in engine that records its calls and answers from the request's seed.

    Sample k of a request with seed s (LoRA id j, 0 for the base) wants 1 + (s + k + 3j) % 7 tokens: it ends with
    an EOS if that fits in max_tokens, else it is cut at max_tokens (finish_reason "length")."""
    import importlib.machinery
    import sys
    import types

    calls = {"engines": [], "requests": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class LLM:
        def __init__(self, **kwargs):
            calls["engines"].append(kwargs)

        def generate(self, prompts, params, use_tqdm, lora_request=None):
            lora = lora_request.lora_int_id if lora_request else 0
            outputs = []
            for _prompt, p in zip(prompts, params):
                lora_path = lora_request and lora_request.lora_path
                calls["requests"].append((p.seed, p.max_tokens, lora_path, p.temperature, p.extra_args))
                samples = []
                for k in range(p.n):
                    want = 1 + (p.seed + k + 3 * lora) % 7
                    if want < p.max_tokens:
                        samples.append(
                            types.SimpleNamespace(token_ids=[5] * want + [tokenizer.eos_token_id], finish_reason="stop")
                        )
                    else:
                        samples.append(types.SimpleNamespace(token_ids=[5] * p.max_tokens, finish_reason="length"))
                outputs.append(types.SimpleNamespace(outputs=samples))
            return outputs

    modules = {
        "vllm": dict(LLM=LLM, SamplingParams=SamplingParams),
        "vllm.lora": {},
        "vllm.lora.request": dict(LoRARequest=LoRARequest),
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


# ------------------------------------------------------------------------------- a LenVM and policy trainers


@pytest.fixture(scope="module")
def lenvm_path(tmp_path_factory, tokenizer) -> str:
    """A random tiny LenVM (γ 0.9) saved with the policy's tokenizer, as `train-lenvm` saves one."""
    from lenvm_rl.modeling import LenVMModel

    path = tmp_path_factory.mktemp("lenvm")
    torch.manual_seed(1)
    LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dataset():
    """16 arithmetic prompts at budgets 3 and 6, every kind: the policy trainers' tests' prompts."""
    from lenvm_rl.data import DatasetArguments, load_prompts

    return load_prompts(DatasetArguments(num_prompts=16, budgets=[3, 6], budget_kinds=["exact", "at_most", "at_least"]))


def make_trainer(
    model_path,
    tokenizer,
    dataset,
    output_dir,
    peft_config=None,
    trainer_class=None,
    config_class=None,
    rewards=None,
    segments=None,
    **overrides,
):
    """A 2-step policy trainer on the tiny model (``LenVMGRPOTrainer`` and its config unless given; accuracy and
    length score unless ``rewards``; ``segments`` for prompts with thinking budgets). The length score varies with
    length on a random model; accuracy alone would give constant returns."""
    from transformers import AutoModelForCausalLM

    from lenvm_rl.grpo import LenVMGRPOConfig, LenVMGRPOTrainer
    from rewards import Accuracy, LengthScore

    settings = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        lenvm_batch_size=3,
    )
    config = (config_class or LenVMGRPOConfig)(**{**settings, **overrides})
    rewards = rewards or [Accuracy(), LengthScore(eos_token_id=tokenizer.eos_token_id)]
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer_class = trainer_class or LenVMGRPOTrainer
    extra = {} if segments is None else {"segments": segments}
    return trainer_class(model, rewards, config, dataset, processing_class=tokenizer, peft_config=peft_config, **extra)
