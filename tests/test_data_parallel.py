"""Data-parallel `rollout` and `evaluate` (`lenvm_rl/data_parallel.py`): two CPU processes under `accelerate launch`
write what one process writes (shards, generations, results), a bad recipe stops both processes with one line,
and under a multi-process launch every process gets its own vLLM engine the way TRL's colocate mode starts them."""

import json
import os
import shutil

import pytest
import torch
import yaml
from test_multiprocess import launch

from lenvm_rl.data_parallel import Ranks, merge_records, part_path, vllm_launch_settings
from lenvm_rl.errors import ConfigError
from lenvm_rl.evaluate import EvaluateArguments, run_evaluation
from lenvm_rl.rollout import RolloutArguments, run_rollouts
from lenvm_rl.rollout_data import load_rollouts
from lenvm_rl.vllm_sampling import make_vllm_generate


def write_recipe(path, **fields) -> str:
    path.write_text(yaml.safe_dump(fields))
    return str(path)


@pytest.fixture
def one_thread():
    """The reference runs in this process with the launched processes' one thread (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rollout_with_two_processes_writes_what_one_writes(tiny_model_path, tmp_path, one_thread):
    """The two processes resume a folder one process wrote, each sampling one missing shard; a changed recipe then
    stops both with one line (process 1 neither waits for process 0 forever nor samples) and loses no shard."""
    recipe = dict(
        model_name_or_path=tiny_model_path,
        dataset_name="arithmetic",
        num_prompts=10,
        shard_size=2,
        num_samples_per_prompt=2,
        max_completion_tokens=8,
        prompts_per_batch=2,
        temperature=1.0,
        seed=3,
        dtype="float32",  # not auto: its pick may depend on the thread count
    )
    run_rollouts(
        RolloutArguments(
            **{k: v for k, v in recipe.items() if k not in ("model_name_or_path", "dtype")},
            output_dir=str(tmp_path / "one"),
        ),
        tiny_model_path,
        "float32",
    )
    expected = load_rollouts(tmp_path / "one").to_list()
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    for shard in ("shard-00001", "shard-00004"):
        shutil.rmtree(tmp_path / "two" / "shards" / shard)
    config = write_recipe(tmp_path / "two.yaml", **recipe, output_dir=str(tmp_path / "two"))
    done = launch(["-m", "lenvm_rl", "rollout", "--config", config], 2, tmp_path)
    assert "20 rollouts in" in done.stdout and "(2 processes)" in done.stdout  # data-parallel, not two jobs
    assert len(expected) == 20 and load_rollouts(tmp_path / "two").to_list() == expected

    config = write_recipe(tmp_path / "bad.yaml", **{**recipe, "temperature": 0.5}, output_dir=str(tmp_path / "two"))
    done = launch(["-m", "lenvm_rl", "rollout", "--config", config], 2, tmp_path, check=False)
    assert done.returncode != 0
    line = "lenvm-rl rollout: error: output_dir: "
    assert done.stderr.count(line) == 2 and "(temperature: 1.0 there, 0.5 now)" in done.stderr  # one per process
    assert "ConfigError" not in done.stderr  # the only traceback is the launcher's report of the exit code
    assert load_rollouts(tmp_path / "two").to_list() == expected


def test_evaluate_with_two_processes_writes_what_one_writes(tiny_model_path, tmp_path, one_thread):
    recipe = dict(
        model_name_or_path=tiny_model_path,
        num_prompts=5,
        budgets=[2, 6],
        budget_kinds=["exact", "at_least"],
        max_new_tokens=8,
        temperature=1.0,
        batch_size=3,
        num_samples=2,
        seed=0,
        hard_truncation=True,
        dtype="float32",
    )
    timeless = lambda path: [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()
    ]
    run_evaluation(EvaluateArguments(**recipe, output_dir=str(tmp_path / "one")))
    config = write_recipe(tmp_path / "two.yaml", **recipe, output_dir=str(tmp_path / "two"))
    launch(["-m", "lenvm_rl", "evaluate", "--config", config], 2, tmp_path)
    generations = {}
    for run in ("one", "two"):
        generations[run] = {f.name: timeless(f) for f in sorted((tmp_path / run / "generations").glob("*.jsonl"))}
    assert list(generations["two"]) == ["base.jsonl", "base_+_truncation.jsonl"]  # merged: no part file left
    assert generations["two"] == generations["one"] and len(generations["one"]["base.jsonl"]) == 5 * 4 * 2
    results = [json.loads((tmp_path / run / "results.json").read_text())["results"] for run in ("one", "two")]
    assert results[1] == results[0]


def test_share_takes_every_world_th_unit():
    assert Ranks(rank=1, world=3).share(list(range(8))) == [1, 4, 7]
    assert Ranks().share(range(3)) == [0, 1, 2]


def test_main_first_raises_the_config_error_of_process_0():
    def fails():
        raise ConfigError("budgets: must be positive, got -1")

    with pytest.raises(ConfigError, match="budgets: must be positive"):
        Ranks().main_first(fails)
    assert Ranks().main_first(lambda: 7) == 7


def test_merge_keeps_every_record_once_in_order_and_removes_the_parts(tmp_path):
    path = tmp_path / "base.jsonl"
    path.write_text(json.dumps({"row": 0, "sample_index": 0, "v": "a"}) + "\n" + '{"row": 3, "torn')
    part_path(path, 1).write_text(
        "".join(json.dumps({"row": r, "sample_index": s, "v": "b"}) + "\n" for r, s in ((2, 1), (2, 0), (0, 0)))
    )
    part_path(path, 0).write_text(json.dumps({"row": 1, "sample_index": 0, "v": "c"}) + "\n")
    records = merge_records(path, lambda r: (r["row"], r["sample_index"]))
    assert [(r["row"], r["sample_index"], r["v"]) for r in records] == [
        (0, 0, "a"),
        (1, 0, "c"),
        (2, 0, "b"),
        (2, 1, "b"),
    ]
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.jsonl"]


def test_every_process_starts_its_own_vllm_engine(stand_in_vllm, monkeypatch):
    """Like TRL's colocate mode: vLLM joins the launch (`external_launcher`) with the process's RANK/LOCAL_RANK."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "unset")
    make_vllm_generate(
        "some/model",
        num_samples=2,
        temperature=1.0,
        top_p=1.0,
        eos_ids={2},
        seed=5,
        ranks=Ranks(rank=3, world=4, local_rank=1),
    )
    (engine,) = stand_in_vllm["engines"]
    assert engine["distributed_executor_backend"] == "external_launcher" and engine["seed"] == 5
    assert "tensor_parallel_size" not in engine
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert vllm_launch_settings(Ranks(), 2) == {}  # one process: vLLM starts its own workers as before


@pytest.mark.parametrize("size, problem", [(3, "must divide"), (2, "is not supported")])
def test_tensor_parallel_engines_under_a_launch_are_refused(size, problem):
    with pytest.raises(ConfigError, match=rf"vllm_tensor_parallel_size: {size} .*{problem}"):
        vllm_launch_settings(Ranks(rank=0, world=4), size)
