"""A run owns its output_dir (`outputs.claim_output_dir`): a second process writing into it is refused while the
first lives, and a training stage does not replace an earlier run without --resume_from_checkpoint or
overwrite_output_dir."""

import subprocess
import sys

import pytest
from conftest import ROOT
from test_faults import grpo_recipe, quiet_progress, rollout_recipe, run_cli

from lenvm_rl.errors import ConfigError
from lenvm_rl.outputs import claim_output_dir

HOLD = "import sys; from lenvm_rl.outputs import claim_output_dir; claim_output_dir(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


def test_a_second_run_into_a_held_folder_is_refused_until_the_first_ends(
    tiny_model_path, tmp_path, monkeypatch, capsys
):
    """Two rollout processes on one folder: the second is refused by the first's lock, writes nothing, and runs once
    the first has ended (the kernel releases the lock with the process, however it ends)."""
    import lenvm_rl.rollout
    from lenvm_rl.cli import main

    quiet_progress(lenvm_rl.rollout, monkeypatch)
    output_dir = tmp_path / "rollouts"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        assert first.stdout.readline().strip() == "held"
        recipe = rollout_recipe(tmp_path, tiny_model_path)
        line = run_cli(["rollout", "--config", str(recipe)], capsys)
        assert line == (
            f"lenvm-rl rollout: error: output_dir: another lenvm-rl run (pid {first.pid}) is writing to "
            f"{str(output_dir)!r}; wait for it to end, or give another output_dir"
        )
        assert list(output_dir.iterdir()) == []
    finally:
        first.communicate(input="", timeout=30)
    main(["rollout", "--config", str(recipe)])
    assert len(list((output_dir / "shards").iterdir())) == 2


def test_an_earlier_run_is_replaced_only_when_asked(tmp_path):
    """A training stage refuses a folder with an earlier run's checkpoints or final model; resuming is allowed, and
    overwrite_output_dir deletes the earlier checkpoints (a later resume must not pick one of them up)."""
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint
    with pytest.raises(ConfigError, match=r"holds an earlier run \(checkpoint-10, checkpoint-2\)"):
        claim_output_dir(str(tmp_path), training=True)
    claim_output_dir(str(tmp_path), training=True, resuming=True)
    with pytest.raises(ConfigError, match="^overwrite_output_dir: true replaces the earlier run that resume_from"):
        claim_output_dir(str(tmp_path), training=True, resuming=True, overwrite=True)
    assert (tmp_path / "checkpoint-10").is_dir()
    claim_output_dir(str(tmp_path), training=True, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-notes"]
    claim_output_dir(str(tmp_path), training=True)  # nothing earlier left
    claim_output_dir(str(tmp_path / "new" / "folder"), training=True)  # created


def test_a_rerun_of_the_same_grpo_recipe_does_not_replace_the_finished_run(tiny_model_path, tmp_path, capsys):
    from lenvm_rl.cli import main

    recipe = grpo_recipe(tmp_path, tiny_model_path)
    main(["grpo", "--config", str(recipe)])
    weights = tmp_path / "out" / "model.safetensors"
    saved = weights.stat().st_mtime_ns
    line = run_cli(["grpo", "--config", str(recipe)], capsys)
    assert line.startswith(
        f"lenvm-rl grpo: error: output_dir: {str(tmp_path / 'out')!r} holds an earlier run (a final model)"
    )
    assert weights.stat().st_mtime_ns == saved
    main(["grpo", "--config", str(recipe), "--overwrite_output_dir", "true"])
    assert weights.stat().st_mtime_ns != saved  # replaced, as asked


def test_a_file_system_without_locks_is_said_not_fatal(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    claim_output_dir(str(tmp_path / "out"))
    assert capsys.readouterr().err == (
        f"lenvm-rl: warning: cannot lock {str(tmp_path / 'out')!r} (No locks available); a second run into it would "
        f"not be refused\n"
    )
