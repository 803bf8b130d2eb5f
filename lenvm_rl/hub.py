"""The Hub and the run record: what every training stage writes for a later push, and the push itself.

``record_run`` (``lenvm_rl_run.json``), ``model_card`` (README.md at the final save), ``defer_push`` and
``push_folder``, used by ``train-lenvm``, ``grpo`` and ``ppo`` (``push_to_hub: true`` pushes once the model is
saved) and by the ``push`` stage (``lenvm_rl/push.py``, `lenvm-rl push PATH --hub_model_id user/name`). The folder's kind decides what is uploaded, top-level files only:

- adapter (``adapter_config.json``, a LoRA grpo run): adapter_config.json, adapter_model.safetensors;
- LenVM (``config.json`` with model_type lenvm): config.json, model.safetensors (or its shards and index);
- policy (any other ``config.json``, a full-fine-tune grpo run): config.json, generation_config.json, weights;

each with its tokenizer files, ``lenvm_rl_run.json`` (the command as run and every recipe field, written by
``record_run`` at train time) and README.md, the card generated here. Never checkpoints/, logs, optimizer
states, training_args.bin or rollouts. The upload is one commit; the card is sent from memory, so a push writes
and removes nothing locally. Any Hub failure (no token, offline mode, HTTP error, unreachable host) becomes one
``ConfigError`` line that says the local files are intact.

The card's metrics: grpo, the last logged value of each reward and length metric in ``trainer_state.json``;
train-lenvm, the held-out length metrics in ``eval_results.json``.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from lenvm_rl.errors import ConfigError

RUN_RECORD = "lenvm_rl_run.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
UPLOADED = {
    "adapter": ("adapter_config.json", "adapter_model.safetensors"),
    "lenvm": ("config.json", *WEIGHT_FILES),
    "policy": ("config.json", "generation_config.json", *WEIGHT_FILES),
}
# Hub ids of the models `loading.EMBEDDED_MODELS` ships offline, for the card's base_model.
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# The card's grpo metrics: last logged value of the task rewards and the budget metrics (and their eval_ twins).
GRPO_METRICS = re.compile(
    r"(eval_)?(reward|rewards/.+/mean|length/(mean_length_score|budget_hit_rate|mean_length_tokens))"
)


def record_run(output_dir: str, stage: str, argv: list[str] | None, *recipe) -> None:
    """Write ``lenvm_rl_run.json``: the command as run (tokens redacted) and every field of the recipe dataclasses."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg.startswith("--hub_token="):
            args[i] = "--hub_token=<HUB_TOKEN>"
        elif i > 0 and args[i - 1] == "--hub_token":
            args[i] = "<HUB_TOKEN>"
    fields = {k: v for part in recipe for k, v in asdict(part).items()}
    fields = {k: f"<{k.upper()}>" if k.endswith("_token") and v is not None else v for k, v in fields.items()}
    record = {"stage": stage, "command": shlex.join(["lenvm-rl", stage, *args]), "recipe": fields}
    Path(output_dir, RUN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")


def defer_push(config) -> str | None:
    """The repo to push to once the model is saved (None: no push); turns the Trainer's own push off.

    transformers' Trainer with ``push_to_hub`` creates the repo in ``__init__`` and pushes the whole output_dir
    on every save (checkpoints included): a run without network would crash before its first step, and the Hub
    would get more than the model. The run pushes once, at the end, with ``push_folder``.
    """
    if not config.push_to_hub:
        return None
    if not config.hub_model_id:
        raise ConfigError("hub_model_id: push_to_hub needs the repo to push to; set hub_model_id: <user>/<name>")
    check_repo_id(config.hub_model_id)
    config.push_to_hub = False
    return config.hub_model_id


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"hub_model_id: {repo_id!r} is not a Hub repo id; use <user or org>/<name> (letters, digits, - _ .)"
        ) from None


def folder_kind(folder: Path) -> str:
    """'adapter', 'lenvm' or 'policy', from the files a save leaves; anything else is refused with the fix."""
    fix = "give the output_dir of `lenvm-rl grpo` or `lenvm-rl train-lenvm` (the folder with the saved model)"
    if (folder / "adapter_config.json").is_file():
        kind = "adapter"
    elif (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        kind = "lenvm" if model_type == "lenvm" else "policy"
        if kind == "policy" and run_record(folder).get("stage") not in ("grpo", "ppo"):
            raise ConfigError(
                f"push: {folder} holds a {model_type!r} model that lenvm-rl did not train (no {RUN_RECORD} from grpo "
                f"or ppo); {fix}"
            )
    else:
        problem = "does not exist" if not folder.exists() else "holds no adapter_config.json nor config.json"
        raise ConfigError(f"push: {folder} {problem}; {fix}")
    weights = "adapter_model.safetensors" if kind == "adapter" else "model*.safetensors"
    if not any(folder.glob(weights)):
        raise ConfigError(f"push: {folder} has no {weights} weights (was the run saved to the end?); {fix}")
    return kind


def upload_files(folder: Path, kind: str) -> list[Path]:
    """The top-level files of ``folder`` that a push of this kind uploads (the card is added separately)."""
    patterns = (*UPLOADED[kind], *TOKENIZER_FILES, RUN_RECORD)
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in patterns))


def run_record(folder: Path) -> dict:
    path = folder / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def final_metrics(folder: Path, kind: str) -> list[tuple[str, float, int | None]]:
    """(metric, value, step) rows for the card: grpo's last logged values, or train-lenvm's eval results."""
    if kind == "lenvm":
        path = folder / "eval_results.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        skip = ("runtime", "per_second", "epoch")
        return [(k, v, None) for k, v in results.items() if isinstance(v, (int, float)) and not k.endswith(skip)]
    path = folder / "trainer_state.json"
    if not path.is_file():
        return []
    last = {}
    for row in json.loads(path.read_text())["log_history"]:
        for key, value in row.items():
            if GRPO_METRICS.fullmatch(key) and isinstance(value, (int, float)):
                last[key] = (value, row.get("step"))
    return [(key, value, step) for key, (value, step) in sorted(last.items())]


def hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it names a Hub repo (the card's metadata must), else None (a local folder)."""
    name_or_path = EMBEDDED_HUB_IDS.get(str(name_or_path).lower(), name_or_path)
    if not name_or_path or Path(name_or_path).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return None
    return name_or_path


def model_card(folder: str | Path, repo_id: str | None = None, saved_as: str | Path | None = None) -> ModelCard:
    """The card of a saved run: metadata, what was trained on what, final metrics, the command, how to load it.

    ``saved_as``: the folder the card names when ``folder`` is where the files are written aside (``final_save``).
    """
    folder = Path(folder)
    saved_as = Path(saved_as or folder)
    kind = folder_kind(folder)
    record = run_record(folder)
    recipe = record.get("recipe", {})
    stage = "ppo" if record.get("stage") == "ppo" else "grpo"  # a policy's trainer; unused for a LenVM
    config_file = "adapter_config.json" if kind == "adapter" else "config.json"
    config = json.loads((folder / config_file).read_text())
    if kind == "lenvm":
        base = recipe.get("model_name_or_path") or config.get("backbone_config", {}).get("_name_or_path")
    else:
        base = recipe.get("model_name_or_path") or config.get("base_model_name_or_path") or config.get("_name_or_path")
    dataset = recipe.get("dataset_name")
    data = ModelCardData(
        base_model=hub_id(base),
        library_name="peft" if kind == "adapter" else "transformers",
        tags=["lenvm-rl", "lenvm" if kind == "lenvm" else stage, "length-control"] + ["lora"] * (kind == "adapter"),
        datasets=[hub_id(dataset)] if hub_id(dataset) else None,
        pipeline_tag=None if kind == "lenvm" else "text-generation",
    )
    summary, rows = training_rows(kind, base, recipe, config, stage)
    if dataset:
        prompts = f", {recipe['num_prompts']} prompts" if recipe.get("num_prompts") else ""
        rows.append(("Dataset", f"`{dataset}`{prompts}"))
    if recipe.get("max_steps", -1) > 0:
        rows.append(("Steps", f"{recipe['max_steps']}, learning rate {recipe['learning_rate']}, seed {recipe['seed']}"))
    lines = [f"# {(repo_id or saved_as.resolve().name).split('/')[-1]}", "", summary]
    lines += ["", "## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]

    metrics = final_metrics(folder, kind)
    lines += ["", "## Final metrics", ""]
    if metrics and kind == "lenvm":
        lines += ["On the held-out rollouts (`eval_results.json`).", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v, _ in metrics]
    elif metrics:
        lines += ["Last logged values (`trainer_state.json`).", "", "| Metric | Value | Step |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4g} | {step} |" for k, v, step in metrics]
    else:
        lines.append("No metrics were saved with this model.")

    lines += ["", "## Reproduce", ""]
    if record:
        lines += [
            "```bash",
            record["command"],
            "```",
            "",
            f"Every resolved recipe field is in `{RUN_RECORD}` beside the weights.",
        ]
    else:
        lines.append(f"Not recorded (the folder has no `{RUN_RECORD}`).")

    load_id = repo_id or str(saved_as)
    lines += ["", "## Use", "", "```python"]
    if kind == "adapter":
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{load_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
        ]
    elif kind == "lenvm":
        lines += [
            "from lenvm_rl.modeling import load_lenvm  # pip install lenvm-rl",
            "",
            f'lenvm = load_lenvm("{load_id}")  # .length_values (B, S) in (-1, 0)',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{load_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
        ]
    lines += ["```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def training_rows(
    kind: str, base: str | None, recipe: dict, config: dict, stage: str = "grpo"
) -> tuple[str, list[tuple[str, str]]]:
    """The card's opening sentence and its (field, value) rows: base model, LenVM, objective, budgets, rewards."""
    rows = [("Base model", f"`{base}`" if base else "not recorded")]
    if kind == "lenvm":
        gamma, rollouts = config.get("gamma"), recipe.get("rollouts_path")
        summary = (
            f"A Length Value Model (LenVM) trained with lenvm-rl on `{base}`: a value head that reads the backbone's "
            f"hidden state at every token and predicts how much generation is left, V = -(1 - γ^remaining) with "
            f"γ = {gamma}. It is the length critic of `lenvm-rl grpo` (`lenvm_model_path`) and guides decoding "
            f"towards a token budget."
        )
        manifest = Path(rollouts, "rollout_args.json") if rollouts else None
        sampled = json.loads(manifest.read_text()) if manifest and manifest.is_file() else {}
        policy = f", sampled from `{sampled['model_name_or_path']}`" if "model_name_or_path" in sampled else ""
        truncated = "bootstrapped" if config.get("bootstrap_truncated") else "dropped"
        return summary, rows + [
            ("LenVM", "this model"),
            (
                "Length objective",
                f"value regression ({config.get('value_loss')} loss), γ = {gamma}, truncated rollouts {truncated}",
            ),
            ("Rollouts", f"`{rollouts}`{policy}" if rollouts else "not recorded"),
            ("Budgets", budget_text(sampled)),
            ("Reward functions", "none (value regression on sampled lengths)"),
        ]
    summary = (
        f"{'LoRA adapter' if kind == 'adapter' else 'Full fine-tune'} of `{base}` trained with lenvm-rl "
        f"{stage.upper()} to hit a token budget stated in the prompt: a frozen Length Value Model adds per-token "
        f"length advantages to {'the task critic' if stage == 'ppo' else 'GRPO'}'s task advantages."
    )
    objective = recipe.get("length_objective", "not recorded")
    if objective not in ("none", "not recorded"):
        objective += (
            f" (c = {recipe['length_advantage_coef']}, score {recipe['length_score']}, λ = {recipe['length_lambda']})"
        )
    lenvm = recipe.get("lenvm_model_path")
    rows += [
        ("LenVM", f"`{lenvm}`" if lenvm else "none"),
        ("Length objective", objective),
        ("Budgets", budget_text(recipe)),
        ("Reward functions", ", ".join(f"`{r}`" for r in recipe.get("reward_funcs", [])) or "not recorded"),
    ]
    if kind == "adapter":
        modules = config.get("target_modules") or []
        modules = modules if isinstance(modules, str) else ", ".join(sorted(modules))
        rows.append(("LoRA", f"r = {config.get('r')}, α = {config.get('lora_alpha')}, modules: {modules}"))
    return summary, rows


def budget_text(fields: dict) -> str:
    kinds = ", ".join(fields.get("budget_kinds") or [])
    if fields.get("budget_range"):
        low, high = fields["budget_range"]
        return f"{low}-{high} tokens, log-uniform; kinds {kinds}"
    if fields.get("budgets"):
        return f"{', '.join(map(str, fields['budgets']))} tokens; kinds {kinds}"
    return "none"


def push_folder(
    path: str | Path, repo_id: str, private: bool | None = None, revision: str | None = None, token: str | None = None
) -> str:
    """Upload a saved run's model files and its card to ``repo_id`` in one commit; returns the commit URL."""
    folder = Path(path)
    check_repo_id(repo_id)
    kind = folder_kind(folder)
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in upload_files(folder, kind)]
    card = str(model_card(folder, repo_id)).encode()
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id, operations, commit_message=f"lenvm-rl push: {kind} from {folder.name}", revision=revision
        )
    except (HTTPError, OSError) as error:
        raise ConfigError(hub_failure(error, folder, repo_id)) from None
    return commit.commit_url


def hub_failure(error: Exception, folder: Path, repo_id: str) -> str:
    """One line: why the push failed, that nothing local changed, and the command that retries it."""
    detail = (str(error).splitlines() or [""])[0][:200]
    if isinstance(error, LocalTokenNotFoundError):
        reason = "no Hugging Face token; run `hf auth login` or set HF_TOKEN"
    elif isinstance(error, OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set; unset it on a machine that can reach the Hub"
    elif isinstance(error, HfHubHTTPError):
        status, message = error.response.status_code, error.server_message or detail
        reason = f"the Hub refused the upload to {repo_id} (HTTP {status}: {message})"
    else:
        reason = f"could not reach the Hub ({type(error).__name__}: {detail})"
    return (
        f"push: {reason}; the local files in {folder} are intact; "
        f"retry with `lenvm-rl push {folder} --hub_model_id {repo_id}`"
    )
