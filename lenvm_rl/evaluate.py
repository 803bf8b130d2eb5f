"""`lenvm-rl evaluate --config recipes/<Model>/evaluate/config_<variant>.yaml`: does a model hit its budgets?

Every held-out prompt is asked once per budget and kind (``budgets`` × ``budget_kinds``, the same
instruction the budget transform writes), for the base model and for the base model with each LoRA
adapter in ``adapters``. Reported per (model, kind, budget): accuracy, mean tokens (EOS excluded),
LIFEBench length deviation (L - N) / N (mean and mean absolute), length score, and hit rate (exact:
|L - N| / N <= 10 %; at_most: L <= N; at_least: L >= N). ``hard_truncation`` adds the paper's token-budget
baseline: generation stops at N tokens and an answer cut off before its EOS counts as wrong.
``guided_decoding`` adds LenVM-guided decoding (``lenvm_rl.decoding``) with the LenVM at
``lenvm_model_path``; every arm's generation time per token is reported beside the table.

Generation runs on vLLM when it is installed and a GPU is visible (``use_vllm``; one engine serves the
base and every adapter, each applied per request as a LoRA), else with ``model.generate`` (on the GPU
when there is one). Guided arms always use ``model.generate``: the LenVM scores candidates through the
HF KV cache at every step. The backend of each arm is in ``results.json`` and beside its cost per token.

Writes ``<output_dir>/results.json``, ``results.md`` (the Markdown table), ``length_score.png`` (length
score against budget) and ``pareto.png`` (accuracy against mean tokens). Generations are appended to
``<output_dir>/generations/<label>.jsonl`` one batch at a time and batch i is sampled with seed
``seed + i``, so a rerun after an interruption skips what is written and finishes as an uninterrupted
run would have.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from tqdm.auto import tqdm

from lenvm_rl.data import DatasetArguments, load_prompts, source_fingerprint
from lenvm_rl.data_parallel import Ranks, launched_ranks, merge_records, part_path, parts_of, read_jsonl
from lenvm_rl.errors import ConfigError, changed_setting, require_vllm
from lenvm_rl.returns import BUDGET_KINDS, budget_hit, budget_kind_codes, lifebench_length_score

METRICS = ("accuracy", "mean_tokens", "length_deviation", "abs_length_deviation", "length_score", "hit_rate")


@dataclass
class EvaluateArguments(DatasetArguments):
    """Which models, which prompts and budgets, and how to generate."""

    model_name_or_path: str = field(
        default="smollm2-135m-instruct", metadata={"help": "The base model: a Hub id, a local path, or the embedded default."}
    )
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "LoRA adapter folders (e.g. `lenvm-rl grpo` output) to evaluate on the base."}
    )
    include_base: bool = field(default=True, metadata={"help": "Also evaluate the base model without an adapter."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "Names in the table: one per evaluated model (base first); default from paths."}
    )
    plain_decoding: bool = field(
        default=True,
        metadata={"help": "Evaluate each model with its own sampling; false keeps only the truncation / guided arms "
                          "(e.g. to generate them in another process, into another output_dir)."},
    )
    hard_truncation: bool = field(
        default=False, metadata={"help": "Also evaluate each model with generation cut at the budget (cut = wrong)."}
    )
    lenvm_model_path: str | None = field(
        default=None, metadata={"help": "A LenVM (`lenvm-rl train-lenvm` output) for guided_decoding."}
    )
    guided_decoding: bool = field(
        default=False, metadata={"help": "Also evaluate each model with LenVM-guided decoding (needs lenvm_model_path)."}
    )
    guidance_mode: str = field(default="select", metadata={"help": "select (by budget kind) or tilt (p·exp(βV))."})
    guidance_top_k: int = field(default=8, metadata={"help": "Candidates scored per step: the top k tokens ..."})
    guidance_top_p: float = field(default=0.95, metadata={"help": "... within this nucleus mass ..."})
    guidance_min_p: float = field(
        default=0.3,
        metadata={"help": "... and at least min_p times the top probability (0.3 kept SmolLM2's accuracy; 0 lost it)."},
    )
    guidance_beta: float = field(default=0.0, metadata={"help": "β of tilt mode: > 0 shorter, < 0 longer."})
    output_dir: str = field(default="runs/evaluate", metadata={"help": "Where results, tables, plots and generations go."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation limit; a completion without EOS is truncated."})
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
        metadata={"help": "Generate the plain and truncation arms with vLLM: unset = when vLLM is installed and a GPU is visible."},
    )
    vllm_gpu_memory_utilization: float = field(default=0.8, metadata={"help": "vLLM's GPU memory share."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs vLLM splits the model over (from one process; the others must be visible)."}
    )

    def __post_init__(self):
        super().__post_init__()
        require_vllm(self.use_vllm)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.budgets is None:
            raise ConfigError("budgets: evaluate needs the budgets to ask for, e.g. budgets: [16, 32, 64]")
        if self.budget_range is not None:
            raise ConfigError("budget_range: evaluate asks every prompt at every budget; give budgets: [...] instead")
        for name in ("max_new_tokens", "num_samples", "batch_size", "vllm_tensor_parallel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(f"num_samples: greedy decoding (temperature 0) gives one completion, got {self.num_samples}; set 1")
        if not (self.plain_decoding or self.hard_truncation or self.guided_decoding):
            raise ConfigError("plain_decoding: false with neither hard_truncation nor guided_decoding leaves no arm; set one")
        if not self.include_base and not self.adapters:
            raise ConfigError("include_base: false leaves nothing to evaluate; list adapters or set include_base: true")
        if self.guided_decoding and self.lenvm_model_path is None:
            raise ConfigError("lenvm_model_path: guided_decoding needs a LenVM; give the output_dir of `lenvm-rl train-lenvm`")
        from lenvm_rl.decoding import GUIDANCE_MODES

        if self.guidance_mode not in GUIDANCE_MODES:
            raise ConfigError(f"guidance_mode: {self.guidance_mode!r} is unknown; use one of {', '.join(GUIDANCE_MODES)}")
        if self.guidance_top_k < 1 or not 0 < self.guidance_top_p <= 1 or not 0 <= self.guidance_min_p < 1:
            raise ConfigError(
                f"guidance_top_k / guidance_top_p / guidance_min_p: need k >= 1, p in (0, 1], min_p in [0, 1); got "
                f"{self.guidance_top_k}, {self.guidance_top_p}, {self.guidance_min_p}"
            )
        if self.labels is not None and len(self.labels) != len(self.models()):
            raise ConfigError(f"labels: give one per evaluated model ({len(self.models())}: the base, then each adapter), got {len(self.labels)}")
        twice = [a for a in dict.fromkeys(self.adapters) if self.adapters.count(a) > 1]
        if twice:
            raise ConfigError(f"adapters: {twice[0]!r} is listed twice; list each adapter once")
        # An arm's generations file is named after its label: two arms with one name would share (and delete) it.
        files = [generations_name(label) for label, _, _ in self.model_specs()]
        clash = next((f for f in files if files.count(f) > 1), None)
        if clash is not None:
            raise ConfigError(f"labels: two evaluated models are both named {clash!r}; give distinct labels, one per model")

    def backend(self) -> str:
        """"vllm" or "hf": the generator of the plain and truncation arms (guided arms are always "hf")."""
        if self.use_vllm is None:
            return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"
        return "vllm" if self.use_vllm else "hf"

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
    """"base" and each adapter's folder name, lengthened to as many trailing path parts as it takes to tell them
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
    return concatenate_datasets([
        add_budgets(plain, budgets=[budget], kinds=[kind]) for kind in args.budget_kinds for budget in args.budgets
    ])


Sampler = Callable[[Dataset, list[list[int]], range, int], list[list[tuple[list[int], bool]]]]


def hf_sampler(model, tokenizer, args: EvaluateArguments, logits_processor_for: Callable | None = None) -> Sampler:
    """``sample(batch, prompt_ids, rows, limit)`` with ``model.generate``; ``logits_processor_for(batch, prompt_ids)``
    may return a LogitsProcessorList for that batch (guided decoding)."""
    from lenvm_rl.rollouts import generate_hf

    def sample(batch, prompt_ids, rows, limit):
        processors = logits_processor_for(batch, prompt_ids) if logits_processor_for else None
        return generate_hf(
            model, tokenizer, prompt_ids, args.num_samples, limit, args.temperature, args.top_p, logits_processor=processors
        )

    return sample


def vllm_sampler(generate: Callable, args: EvaluateArguments, adapter: str | None) -> Sampler:
    """``sample(batch, prompt_ids, rows, limit)`` with a ``rollouts.make_vllm_generate`` engine; row i's seed is
    fixed by i (``rollouts.vllm_seeds``), so a resumed run asks for what an uninterrupted one would have."""
    from lenvm_rl.rollouts import vllm_seeds

    def sample(batch, prompt_ids, rows, limit):
        return generate(prompt_ids, vllm_seeds(args.seed, rows, args.num_samples), limit, adapter)

    return sample


def generate_rows(
    sample: Sampler,
    tokenizer,
    prompts: Dataset,
    path: Path,
    args: EvaluateArguments,
    hard_truncation: bool = False,
    desc: str = "evaluate",
    ranks: Ranks = Ranks(),
) -> list[dict]:
    """Generate for every row of ``prompts`` (num_samples each) into the jsonl ``path``; return its records.

    Batches whose rows are all in ``path`` are skipped (a torn last line is dropped, a torn batch generated again),
    and the file is rewritten in row order at the end. A batch holds rows of one budget: with ``hard_truncation``
    the limit is min(N, max_new_tokens). Each record keeps its share of its batch's generation seconds
    (``seconds``) for the cost per token. Under a data-parallel launch each process generates every ``world``-th
    batch into its own part file, which process 0 merges into ``path`` (batch i is seeded by i alone); the others
    return no records.
    """
    from lenvm_rl.rollouts import tokenize_prompts

    path.parent.mkdir(parents=True, exist_ok=True)
    ranks.main_first(lambda: merge_records(path, record_key))  # what an interrupted run left, parts included
    written = Counter(record["row"] for record in read_jsonl(path))
    batches, begin = [], 0
    budgets = prompts["budget_tokens"]
    for end in range(1, len(prompts) + 1):  # cut batches at batch_size and at every change of budget
        if end == len(prompts) or end - begin == args.batch_size or budgets[end] != budgets[begin]:
            batches.append(range(begin, end))
            begin = end
    mine = ranks.share(list(enumerate(batches)))
    todo = [(index, rows) for index, rows in mine if any(written[row] < args.num_samples for row in rows)]
    share = sum(len(rows) for _, rows in mine)
    sink_path = path if ranks.world == 1 else part_path(path, ranks.rank)
    initial = share - sum(len(rows) for _, rows in todo)
    with open(sink_path, "a") as sink, tqdm(
        total=share, initial=initial, desc=desc, unit="prompt", disable=not ranks.is_main
    ) as progress:
        for index, rows in todo:
            batch = prompts.select(rows)
            torch.manual_seed(args.seed + index)
            limit = min(budgets[rows.start], args.max_new_tokens) if hard_truncation else args.max_new_tokens
            prompt_ids = tokenize_prompts(tokenizer, batch["prompt"])
            began = time.perf_counter()
            samples = sample(batch, prompt_ids, rows, limit)
            seconds = (time.perf_counter() - began) / (len(rows) * args.num_samples)
            lines = []
            for row_index, row, group in zip(rows, batch, samples):
                for sample_index, (ids, finished) in enumerate(group):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    record = score_record(row, text, len(ids), finished, hard_truncation)
                    lines.append(json.dumps({"row": row_index, "sample_index": sample_index, "seconds": seconds, **record}))
            sink.write("".join(line + "\n" for line in lines))
            sink.flush()
            os.fsync(sink.fileno())
            progress.update(len(rows))
    ranks.barrier()  # every part is written before process 0 merges them
    return ranks.main_first(lambda: merge_records(path, record_key)) or []


def record_key(record: dict) -> tuple[int, int]:
    return record["row"], record["sample_index"]


def score_record(row: dict, text: str, tokens: int, finished: bool, hard_truncation: bool = False) -> dict:
    """One generation's record: budget, tokens, finished, correct (None without an answer column), text."""
    from rewards import is_correct

    correct = None
    if row.get("answer") is not None:
        correct = is_correct(text, row["answer"]) and (finished or not hard_truncation)
    return {
        "budget_tokens": row["budget_tokens"], "budget_kind": row["budget_kind"], "tokens": tokens,
        "finished": finished, "correct": correct, "completion": text,
    }


def read_records(path: Path) -> list[dict]:
    """The complete records of a generations file; a torn last line (an interrupted write) is left out."""
    return read_jsonl(path)


def summarize(records: list[dict]) -> list[dict]:
    """Per (kind, budget) metrics of the records, kinds in BUDGET_KINDS order, budgets ascending."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["budget_kind"], record["budget_tokens"]), []).append(record)
    summary = []
    for (kind, budget), group in sorted(groups.items(), key=lambda item: (BUDGET_KINDS.index(item[0][0]), item[0][1])):
        lengths = torch.tensor([float(r["tokens"]) for r in group])
        budgets = torch.full_like(lengths, float(budget))
        kinds = budget_kind_codes([kind] * len(group))
        deviation = (lengths - budgets) / budgets
        graded = [r["correct"] for r in group if r["correct"] is not None]
        summary.append({
            "budget_kind": kind,
            "budget_tokens": budget,
            "n": len(group),
            "accuracy": sum(graded) / len(graded) if graded else None,
            "mean_tokens": lengths.mean().item(),
            "length_deviation": deviation.mean().item(),
            "abs_length_deviation": deviation.abs().mean().item(),
            "length_score": lifebench_length_score(lengths, budgets, kinds).mean().item(),
            "hit_rate": budget_hit(lengths, budgets, kinds).float().mean().item(),
            "finished_rate": sum(r["finished"] for r in group) / len(group),
        })
    return summary


def ms_per_token(records: list[dict]) -> float:
    """Generation wall time per generated token (EOS included) over an arm's records, in milliseconds."""
    steps = sum(r["tokens"] + r["finished"] for r in records)
    return 1000 * sum(r.get("seconds", 0.0) for r in records) / max(steps, 1)


def markdown_table(
    results: dict[str, list[dict]], costs: dict[str, float] | None = None, backends: dict[str, str] | None = None
) -> str:
    """One row per (model, kind, budget) plus each model's mean over its budgets; then ms per token."""
    header = "| model | kind | budget | n | accuracy | mean tokens | length dev. | length score | hit rate |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    for label, summary in results.items():
        for s in [*summary, mean_row(summary)]:
            lines.append(
                f"| {label} | {s['budget_kind']} | {s['budget_tokens']} | {s['n']} | {cell(s['accuracy'], '.3f')} | "
                f"{s['mean_tokens']:.1f} | {s['length_deviation']:+.2f} | {s['length_score']:.3f} | {s['hit_rate']:.3f} |"
            )
    if costs:
        backends = backends or {}
        lines += ["", "| model | generation ms per token | generator |", "|---|---:|---|"]
        lines += [f"| {label} | {cost:.1f} | {backends.get(label, 'hf')} |" for label, cost in costs.items()]
    return "\n".join(lines) + "\n"


def mean_row(summary: list[dict]) -> dict:
    """Unweighted mean of the per-budget rows (each budget counts once)."""
    row = {"budget_kind": "all", "budget_tokens": "mean", "n": sum(s["n"] for s in summary)}
    for name in (*METRICS, "finished_rate"):
        values = [s[name] for s in summary if s[name] is not None]
        row[name] = sum(values) / len(values) if values else None
    return row


def plot_results(results: dict[str, list[dict]], output_dir: Path) -> list[Path]:
    """length_score.png (score against budget, a line per model and kind) and pareto.png (accuracy vs tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [output_dir / "length_score.png", output_dir / "pareto.png"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, summary in results.items():
        for kind in BUDGET_KINDS:
            points = [(s["budget_tokens"], s["length_score"]) for s in summary if s["budget_kind"] == kind]
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{label} ({kind})")
    axis.set(xscale="log", xlabel="budget N (tokens)", ylabel="mean length score", ylim=(-0.02, 1.02))
    axis.set_title("Length score against budget")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[0], dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, summary in results.items():
        points = [(s["mean_tokens"], s["accuracy"]) for s in summary if s["accuracy"] is not None]
        if points:
            axis.plot(*zip(*sorted(points)), marker="o", label=label)
            for s in summary:
                if s["accuracy"] is not None:
                    axis.annotate(f"{s['budget_kind'][:5]} {s['budget_tokens']}", (s["mean_tokens"], s["accuracy"]), fontsize=7)
    axis.set(xlabel="mean completion tokens", ylabel="accuracy", ylim=(-0.02, 1.02))
    axis.set_title("Accuracy against length")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=100)
    plt.close(figure)
    return paths


def load_policy(model_name_or_path: str, adapter: str | None, dtype: str):
    """The base model, or the base with a LoRA adapter merged into it, in eval mode on the inference device."""
    from lenvm_rl.loading import inference_device, load_causal_lm

    model = load_causal_lm(model_name_or_path, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        if not Path(adapter, "adapter_config.json").is_file():
            raise ConfigError(f"adapters: {adapter!r} holds no adapter_config.json; give a LoRA output_dir of `lenvm-rl grpo`")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(inference_device()).eval()


def make_guidance(lenvm, args: EvaluateArguments, eos_ids: set[int]) -> Callable:
    """``logits_processor_for(batch, prompt_ids)``: a LenVM-guided processor for one generate call."""
    from transformers import LogitsProcessorList

    from lenvm_rl.decoding import LenVMGuidedLogitsProcessor

    def for_batch(batch: Dataset, prompt_ids: list[list[int]]) -> LogitsProcessorList:
        repeat = args.num_samples  # generate returns the samples of a prompt next to each other
        return LogitsProcessorList([LenVMGuidedLogitsProcessor(
            lenvm,
            budgets=[b for b in batch["budget_tokens"] for _ in range(repeat)],
            kinds=[k for k in batch["budget_kind"] for _ in range(repeat)],
            prompt_lengths=[len(p) for p in prompt_ids for _ in range(repeat)],
            eos_token_ids=eos_ids, mode=args.guidance_mode, top_k=args.guidance_top_k, top_p=args.guidance_top_p,
            min_p=args.guidance_min_p, beta=args.guidance_beta,
        )])

    return for_batch


def drop_if_stale(file: Path, adapter: str | None) -> None:
    """Delete an arm's generations when its adapter's weights changed since they were written (a retrained run)."""
    fingerprint = None
    if adapter is not None:
        weights = sorted(Path(adapter).glob("adapter_model.*"))
        fingerprint = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    stamp = file.with_suffix(".adapter.json")
    if (file.exists() or parts_of(file)) and (not stamp.exists() or json.loads(stamp.read_text()) != fingerprint):
        print(f"{file}: the adapter {adapter} changed since these generations were written; generating them again")
        for written in [file, *parts_of(file)]:
            written.unlink(missing_ok=True)
    file.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint))


def run_evaluation(args: EvaluateArguments, ranks: Ranks = Ranks()) -> dict[str, list[dict]]:
    """Evaluate every arm of ``args.model_specs()``; write results.json / results.md / plots; return summaries.

    Under a data-parallel launch (``ranks``) every process loads the models and generates its share of every arm's
    batches; process 0 writes the manifest, the merged generations and the report, and alone returns summaries."""
    from lenvm_rl.loading import inference_device, load_tokenizer, resolve_model_path
    from lenvm_rl.precision import resolve_dtype
    from lenvm_rl.rollouts import eos_token_ids, generation_eos_ids, make_vllm_generate

    args.dtype = resolve_dtype(args.dtype, inference_device().type)  # the manifest records what "auto" became
    output_dir = Path(args.output_dir)
    manifest = output_dir / "evaluate_args.json"
    backend = args.backend()
    ignored = ("output_dir", "labels", "adapters", "include_base", "plain_decoding", "hard_truncation", "use_vllm", "vllm_gpu_memory_utilization",
               "vllm_tensor_parallel_size")
    settings = {k: v for k, v in asdict(args).items() if k not in ignored}
    settings["dataset_sha256"] = source_fingerprint(args.dataset_name)  # an edited file keeps its name
    if backend == "vllm":  # samples differ from generate's: a resume must not mix the two
        settings["generator"] = "vllm"
    if inference_device().type != "cpu" and (backend == "hf" or args.guided_decoding):
        settings["hf_device"] = inference_device().type  # generate's random streams differ between devices
    previous = json.loads(manifest.read_text()) if manifest.exists() else settings
    key = changed_setting(previous, settings)
    if key is not None:
        raise ConfigError(
            f"output_dir: {output_dir} holds an evaluation with other settings ({key}: {previous.get(key)!r} there, "
            f"{settings.get(key)!r} now; {manifest}); use another output_dir"
            + (", or set use_vllm to match" if key == "generator" else "")
        )
    missing = [adapter for adapter in args.adapters if not Path(adapter, "adapter_config.json").is_file()]
    if missing:  # before the base model is evaluated, not after
        raise ConfigError(f"adapters: {missing[0]!r} holds no adapter_config.json; give a LoRA output_dir of `lenvm-rl grpo`")
    prompts = budgeted_prompts(args)
    tokenizer = load_tokenizer(args.model_name_or_path)
    results, costs, backends, loaded = {}, {}, {}, {}
    lenvm = None
    if args.guided_decoding:  # loaded (and checked) before any engine starts, moved to the GPU after it has
        from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

        lenvm = load_lenvm(args.lenvm_model_path, dtype=getattr(torch, args.dtype)).eval()  # the head stays float32
        check_lenvm_tokenizer(args.lenvm_model_path, tokenizer)
    vllm_generate = None
    if backend == "vllm":  # first: vLLM takes its share of the free GPU memory; the LenVM and HF policy use the rest
        path = resolve_model_path(args.model_name_or_path)
        vllm_generate = make_vllm_generate(
            path, num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
            eos_ids=generation_eos_ids(path, tokenizer), dtype=args.dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed, adapters=list(args.adapters),
            tensor_parallel_size=args.vllm_tensor_parallel_size, ranks=ranks,
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
        ranks.main_first(lambda: drop_if_stale(file, adapter))
        backends[label] = "hf" if decoding == "guided" else backend
        if backends[label] == "vllm":
            sample = vllm_sampler(vllm_generate, args, adapter)
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
    from lenvm_rl.cli import parse_recipe
    from lenvm_rl.outputs import check_output_dir

    (args,) = parse_recipe((EvaluateArguments,), argv)
    ranks = launched_ranks()
    inputs = {"model_name_or_path": args.model_name_or_path, "adapters": args.adapters,
              "lenvm_model_path": args.lenvm_model_path, "dataset_name": args.dataset_name}
    ranks.main_first(lambda: check_output_dir(args.output_dir, inputs))
    results = run_evaluation(args, ranks)
    if not ranks.is_main:
        return results
    saved = json.loads((Path(args.output_dir) / "results.json").read_text())
    print(markdown_table(results, saved["ms_per_token"], saved["generator"]))
    print(f"wrote {args.output_dir}/results.json, results.md, length_score.png, pareto.png")
    return results
