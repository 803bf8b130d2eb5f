"""Hub publishing with the HTTP layer replaced: HfApi's create_repo / create_branch / create_commit are swapped for
a recorder (or for one that raises), so nothing leaves the machine. Checked: the file set and the card of a LoRA
grpo run and of a LenVM (each pushed by its own entry point with push_to_hub: true), `lenvm-rl push` after the
fact, the refusals, and that a Hub failure exits 2 with one line and leaves every local file as it was."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, Response
from huggingface_hub.utils import get_session

from lenvm_rl import cli, grpo, train_lenvm
from lenvm_rl.errors import ConfigError
from lenvm_rl.hub import RUN_RECORD, TOKENIZER_FILES, hub_id, model_card, record_run

TOKENIZER = {"tokenizer.json", "tokenizer_config.json"}  # what the tiny tokenizer saves (chat_template.jinja too)
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", RUN_RECORD, "README.md"}
LENVM_FILES = {"config.json", "model.safetensors", RUN_RECORD, "README.md"}


class FakeHub:
    """Stands in for the Hub's HTTP API: records each call; with ``error`` set, create_repo raises it."""

    def __init__(self, error: Exception | None = None):
        self.error, self.repos, self.branches, self.commits = error, [], [], []

    def install(self, monkeypatch):
        def create_repo(api, repo_id, **kwargs):
            if self.error is not None:
                raise self.error
            self.repos.append((repo_id, kwargs))

        def create_branch(api, repo_id, *, branch, **kwargs):
            self.branches.append((repo_id, branch))

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, **kwargs):
            files = {}
            for op in operations:
                source = op.path_or_fileobj
                files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            self.commits.append(
                SimpleNamespace(repo_id=repo_id, files=files, message=commit_message, revision=revision)
            )
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

        for name, fake in (
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("create_commit", create_commit),
        ):
            monkeypatch.setattr(HfApi, name, fake)
        return self


def card_of(commit) -> ModelCard:
    return ModelCard(commit.files["README.md"].decode())


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def grpo_push(tiny_model_path, lenvm_path, tmp_path_factory):
    """A 2-step LoRA grpo run with a checkpoint on disk and push_to_hub: true; returns (output_dir, fake hub)."""
    folder = tmp_path_factory.mktemp("grpo")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
                num_prompts=8,
                budgets=[3, 6],
                budget_kinds=["exact", "at_most"],
                reward_funcs=["accuracy", "length_score"],
                lenvm_model_path=lenvm_path,
                num_generations=2,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=2,
                logging_steps=1,
                save_strategy="steps",
                save_steps=1,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                disable_tqdm=True,
                output_dir=str(folder / "out"),
                push_to_hub=True,
                hub_model_id="user/tiny-grpo",
            )
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub().install(patch)
        grpo.main(["--config", str(recipe), "--learning_rate", "0.01"])
    return folder / "out", hub


@pytest.fixture(scope="module")
def lenvm_push(tiny_model_path, rollouts_dir, tmp_path_factory):
    """A 2-step train-lenvm run with push_to_hub: true; returns (output_dir, fake hub)."""
    output_dir = tmp_path_factory.mktemp("lenvm") / "out"
    argv = [
        "--model_name_or_path",
        tiny_model_path,
        "--rollouts_path",
        str(rollouts_dir),
        "--eval_prompt_fraction",
        "0.34",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--gamma",
        "0.9",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(output_dir),
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "user/tiny-lenvm",
    ]
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub().install(patch)
        train_lenvm.main(argv)
    return output_dir, hub


# ------------------------------------------------------------------------------------------ push from a recipe


def test_grpo_recipe_pushes_the_adapter_files_only(grpo_push):
    output_dir, hub = grpo_push
    assert [repo for repo, _ in hub.repos] == ["user/tiny-grpo"] and len(hub.commits) == 1
    uploaded = set(hub.commits[0].files)
    assert ADAPTER_FILES | TOKENIZER <= uploaded
    assert uploaded <= ADAPTER_FILES | set(TOKENIZER_FILES)
    on_disk = {p.name for p in output_dir.iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "trainer_state.json", "training_args.bin"} <= on_disk  # never uploaded
    for name in uploaded - {"README.md"}:
        assert hub.commits[0].files[name] == (output_dir / name).read_bytes()


def test_grpo_card(grpo_push, tiny_model_path, lenvm_path):
    output_dir, hub = grpo_push
    card = card_of(hub.commits[0])
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"lenvm-rl", "grpo", "length-control"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is named in the text, never in the Hub metadata
    text = card.text
    assert f"| Base model | `{tiny_model_path}` |" in text
    assert f"| LenVM | `{lenvm_path}` |" in text
    assert "| Length objective | budget (c = 1.0, score lifebench, λ = 1.0) |" in text
    assert "| Budgets | 3, 6 tokens; kinds exact, at_most |" in text
    assert "| Reward functions | `accuracy`, `length_score` |" in text
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    last = [row for row in history if "length/budget_hit_rate" in row][-1]
    assert f"| length/budget_hit_rate | {last['length/budget_hit_rate']:.4g} | 2 |" in text
    for metric in (
        "rewards/accuracy/mean",
        "rewards/length_score/mean",
        "length/mean_length_score",
        "length/mean_length_tokens",
    ):
        assert f"| {metric} |" in text
    command = json.loads((output_dir / RUN_RECORD).read_text())["command"]
    assert command.startswith("lenvm-rl grpo --config ") and command.endswith("--learning_rate 0.01")
    assert f"```bash\n{command}\n```" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("user/tiny-grpo")' in text
    # The local card is the same, generated at save time.
    assert (output_dir / "README.md").read_text() == hub.commits[0].files["README.md"].decode()


def test_lenvm_recipe_pushes_config_weights_and_card(lenvm_push, tiny_model_path, rollouts_dir):
    output_dir, hub = lenvm_push
    assert [repo for repo, _ in hub.repos] == ["user/tiny-lenvm"] and len(hub.commits) == 1
    uploaded = set(hub.commits[0].files)
    assert LENVM_FILES | TOKENIZER <= uploaded <= LENVM_FILES | set(TOKENIZER_FILES)
    assert "eval_results.json" in {p.name for p in output_dir.iterdir()}  # the card's source, not uploaded
    card = card_of(hub.commits[0])
    assert card.data.library_name == "transformers" and {"lenvm-rl", "lenvm", "length-control"} <= set(card.data.tags)
    text = card.text
    assert f"| Base model | `{tiny_model_path}` |" in text and "| LenVM | this model |" in text
    assert "γ = 0.9" in text and f"`{rollouts_dir}`, sampled from `{tiny_model_path}`" in text
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert f"| eval_boundary_mre | {eval_results['eval_boundary_mre']:.4g} |" in text
    assert "eval_runtime" not in text
    assert "```bash\nlenvm-rl train-lenvm --model_name_or_path" in text and 'load_lenvm("user/tiny-lenvm")' in text


def test_base_model_metadata_names_hub_ids_only(grpo_push, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(grpo_push[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    record = json.loads((folder / RUN_RECORD).read_text())
    record["recipe"]["model_name_or_path"] = "smollm2-135m-instruct"  # the embedded default
    (folder / RUN_RECORD).write_text(json.dumps(record))
    assert model_card(folder).data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert hub_id(str(folder)) is None and hub_id("arithmetic") is None


def test_record_run_redacts_the_token(tmp_path):
    from lenvm_rl.push import PushArguments

    record_run(str(tmp_path), "grpo", ["--hub_token", "hf_secret", "--hub_token=hf_secret2"], PushArguments())
    text = (tmp_path / RUN_RECORD).read_text()
    assert "hf_secret" not in text and "<HUB_TOKEN>" in text


# ------------------------------------------------------------------------------------------ lenvm-rl push


def test_cli_push_after_the_fact(grpo_push, monkeypatch, capsys):
    output_dir, _ = grpo_push
    before = checksums(output_dir)
    hub = FakeHub().install(monkeypatch)
    cli.main(["push", str(output_dir), "--hub-model-id", "org/again", "--private", "true", "--revision", "v1"])
    assert hub.repos == [("org/again", {"private": True, "exist_ok": True})] and hub.branches == [("org/again", "v1")]
    commit = hub.commits[0]
    assert commit.revision == "v1" and ADAPTER_FILES <= set(commit.files)
    assert 'from_pretrained("org/again")' in card_of(commit).text
    assert "pushed" in capsys.readouterr().out and checksums(output_dir) == before


def test_cli_push_a_lenvm(lenvm_push, monkeypatch):
    hub = FakeHub().install(monkeypatch)
    cli.main(["push", str(lenvm_push[0]), "--hub_model_id", "user/lenvm-2"])
    assert LENVM_FILES <= set(hub.commits[0].files)


def test_cli_push_a_full_fine_tune(tiny_model_path, tmp_path, monkeypatch):
    folder = tmp_path / "policy"
    shutil.copytree(tiny_model_path, folder)
    (folder / "training_args.bin").write_bytes(b"pickle")
    record_run(str(folder), "grpo", [])  # a grpo run with LoRA off saves the whole policy
    hub = FakeHub().install(monkeypatch)
    cli.main(["push", str(folder), "--hub_model_id", "user/policy"])
    policy_files = {"config.json", "generation_config.json", "model.safetensors", RUN_RECORD, "README.md"}
    assert policy_files | TOKENIZER <= set(hub.commits[0].files) <= policy_files | set(TOKENIZER_FILES)
    card = card_of(hub.commits[0])
    assert card.data.library_name == "transformers" and "grpo" in card.data.tags


def hub_http_error(status: int, message: str) -> HfHubHTTPError:
    request = get_session().build_request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=Response(status, request=request), server_message=message)


@pytest.mark.parametrize(
    "error, reason",
    [
        (
            hub_http_error(403, "You have no write access to user/x"),
            "the Hub refused the upload to user/x (HTTP 403: You have no write access",
        ),
        (
            ConnectionError("Name or service not known"),
            "could not reach the Hub (ConnectionError: Name or service not known)",
        ),
        (LocalTokenNotFoundError("Token is required"), "no Hugging Face token"),
        (None, "HF_HUB_OFFLINE is set"),  # the real HfApi, in offline mode: it refuses before any request
    ],
    ids=["http-403", "unreachable", "no-token", "offline"],
)
def test_hub_error_leaves_local_files_and_exits_2(error, reason, grpo_push, monkeypatch, capsys):
    output_dir, _ = grpo_push
    before = checksums(output_dir)
    if error is None:
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    else:
        FakeHub(error).install(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", str(output_dir), "--hub_model_id", "user/x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"lenvm-rl push: error: push: {reason}")
    assert f"the local files in {output_dir} are intact" in err
    assert checksums(output_dir) == before


def test_grpo_push_failure_keeps_the_trained_adapter(tiny_model_path, tmp_path, monkeypatch):
    FakeHub(ConnectionError("unreachable")).install(monkeypatch)
    with pytest.raises(ConfigError, match="could not reach the Hub.*intact"):
        grpo.main(
            [
                "--model_name_or_path",
                tiny_model_path,
                "--use_peft",
                "true",
                "--lora_r",
                "2",
                "--num_prompts",
                "4",
                "--length_objective",
                "none",
                "--num_generations",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--max_completion_length",
                "4",
                "--max_steps",
                "1",
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--report_to",
                "none",
                "--save_strategy",
                "no",
                "--disable_tqdm",
                "true",
                "--output_dir",
                str(tmp_path),
                "--push_to_hub",
                "true",
                "--hub_model_id",
                "user/x",
            ]
        )
    assert {"adapter_model.safetensors", "README.md", RUN_RECORD} <= {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{folder}", "--hub_model_id", "user/x"], "holds no adapter_config.json nor config.json"),
        (["{folder}/missing", "--hub_model_id", "user/x"], "does not exist"),
        (["{adapter}"], "hub_model_id: say where to push"),
        (["{adapter}", "--hub_model_id", "not a repo"], "is not a Hub repo id"),
        (["--hub_model_id", "user/x"], "give the folder to push first"),
        (["{policy}", "--hub_model_id", "user/x"], "that lenvm-rl did not train"),
    ],
    ids=["not-a-model", "missing", "no-repo", "bad-repo", "no-path", "foreign-model"],
)
def test_push_refusals(argv, message, grpo_push, tiny_model_path, tmp_path, monkeypatch, capsys):
    hub = FakeHub().install(monkeypatch)
    paths = {"folder": tmp_path, "adapter": grpo_push[0], "policy": tiny_model_path}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", *(arg.format(**paths) for arg in argv)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 0
    assert not hub.repos and not hub.commits


def test_push_without_hub_model_id_in_a_recipe_is_refused_before_training(tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match="hub_model_id: push_to_hub needs"):
        grpo.main(
            [
                "--model_name_or_path",
                tiny_model_path,
                "--length_objective",
                "none",
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--output_dir",
                str(tmp_path),
                "--push_to_hub",
                "true",
            ]
        )
