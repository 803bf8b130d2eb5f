"""Where a stage writes, checked before anything loads, and a final save that loses nothing.

Every stage calls ``check_output_dir`` right after parsing its recipe. It refuses an ``output_dir`` that is a
file, that is, contains or lies inside one of the stage's inputs (a model, LenVM, rollouts, adapter, dataset),
that cannot be written (a read-only mount is found now, not after the training run), or, for a training stage,
that holds a file a final save would replace but lenvm-rl did not write (the user's own README.md).

``claim_output_dir`` makes the folder the run's own once its recipe has passed every check, before anything loads:
a lock a second process sees (a second run into the folder is refused while the first lives), and for a training
stage the refusal of a folder that holds an earlier run it would silently replace (docs/DESIGN.md §2.3).

``final_save`` writes a training run's final files into ``output_dir/.final-save`` and only then moves them into
``output_dir`` (a rename within one file system, not a copy): a save that fails half-way (a full disk, a crash)
leaves the model that was there before untouched. The files it moved in are recorded with their size and mtime in
``output_dir/.lenvm_rl_written.json``, which is how a later run knows which files are its own to replace.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from lenvm_rl.errors import ConfigError

STAGING = ".final-save"
WRITTEN = ".lenvm_rl_written.json"
# The top-level names a final save of grpo / ppo / train-lenvm may write (model, tokenizer, card, records).
SAVED_NAMES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "trainer_state.json",
    "training_args.bin",
    "eval_results.json",
    "lenvm_rl_run.json",
    "task_value_head",
    "lenvm",
)


def check_output_dir(output_dir: str, inputs: dict[str, str | list[str] | None], final_save: bool = False) -> None:
    """Refuse an ``output_dir`` that a stage reading ``inputs`` ({field: path or paths}) could not safely write.

    Inputs that are not local paths (a Hub id, a built-in dataset) are skipped. ``final_save``: the stage ends in
    ``final_save`` (grpo, ppo, train-lenvm), so files it would replace must be ones lenvm-rl wrote.
    """
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"output_dir: {output_dir!r} is a file, not a folder; give a folder path (it is created if missing)"
        )
    for name, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths or []:
            source = Path(path).expanduser()
            if not source.exists():
                continue
            source = source.resolve()
            relation = (
                "is"
                if out == source
                else "lies inside"
                if source in out.parents
                else "contains"
                if out in source.parents
                else None
            )
            if relation:
                raise ConfigError(
                    f"output_dir: {output_dir!r} {relation} the {name} {path!r}; writing there would overwrite an "
                    f"input: give a separate output_dir"
                )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {output_dir!r} lies under the file {str(existing)!r}; give a folder path")
    try:  # a real write: permission bits do not show a read-only mount, nor a full disk
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ConfigError(
            f"output_dir: cannot write in {str(existing)!r} ({error.strerror or error}); give a writable folder"
        ) from None
    if final_save:
        foreign = [p.name for p in foreign_files(out, sorted(out.iterdir()) if out.is_dir() else [])]
        if foreign:
            raise ConfigError(
                f"output_dir: {output_dir!r} holds {', '.join(foreign)}, which lenvm-rl did not write and the final "
                f"save would replace; move it away or give another output_dir"
            )


# The output_dirs this process holds: (device, inode) -> the open descriptor its flock lives on.
HELD: dict[tuple[int, int], int] = {}


def claim_output_dir(output_dir: str, training: bool = False, resuming: bool = False, overwrite: bool = False) -> None:
    """Make ``output_dir`` (created if missing) this run's own; call on the main process only.

    The lock is a ``flock`` on the folder itself, held until the process exits: the kernel releases it however the
    process ends (SIGKILL included), so no stale lock is left and a rerun after a crash is accepted. A second run into
    a held folder is refused; the same process may claim it again (a test that runs two stages in-process).

    ``training`` (grpo, ppo, train-lenvm): a folder holding an earlier run (``checkpoint-N`` folders, a final save) is
    refused unless the run resumes it (``resuming``) or ``overwrite`` is set, which deletes the earlier checkpoints so
    that a later ``--resume_from_checkpoint true`` cannot pick one of them up.
    """
    if resuming and overwrite:
        raise ConfigError(
            "overwrite_output_dir: true replaces the earlier run that resume_from_checkpoint continues; drop one of them"
        )
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    status = out.stat()
    if (status.st_dev, status.st_ino) not in HELD:
        descriptor = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = lock_holder(status.st_ino)
            raise ConfigError(
                f"output_dir: another lenvm-rl run{f' (pid {holder})' if holder else ''} is writing to "
                f"{output_dir!r}; wait for it to end, or give another output_dir"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts): run, and say what is lost
            print(
                f"lenvm-rl: warning: cannot lock {output_dir!r} ({error.strerror}); a second run into it would not "
                f"be refused",
                file=sys.stderr,
            )
        HELD[status.st_dev, status.st_ino] = descriptor
    if not training or resuming:
        return
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)), key=str)
    earlier = [p.name for p in checkpoints] + (["a final model"] if (out / WRITTEN).is_file() else [])
    if earlier and not overwrite:
        listed = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise ConfigError(
            f"output_dir: {output_dir!r} holds an earlier run ({listed}) that this run would replace; resume it with "
            f"--resume_from_checkpoint true, give another output_dir, or set overwrite_output_dir: true to replace it"
        )
    for checkpoint in checkpoints:
        shutil.rmtree(checkpoint)


def lock_holder(inode: int) -> str | None:
    """The pid holding a flock on the file with this inode, from /proc/locks (Linux); None where unknown."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
            return fields[4]
    return None


def foreign_files(output_dir: Path, entries: list[Path]) -> list[Path]:
    """The entries among ``entries`` whose names a final save writes but that lenvm-rl did not put there."""
    written = json.loads((output_dir / WRITTEN).read_text()) if (output_dir / WRITTEN).is_file() else {}
    return [
        p
        for p in entries
        if any(fnmatch(p.name, pattern) for pattern in SAVED_NAMES) and written.get(p.name) != fingerprint(p)
    ]


def fingerprint(path: Path) -> list[int]:
    """Size and modification time: a rename keeps both, an edit changes them."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def full_disk(error: BaseException) -> bool:
    """Whether a save failed for want of space (torch and safetensors word it as a failed write)."""
    text = str(error)
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
        phrase in text for phrase in ("No space left on device", "file write failed")
    )


@contextmanager
def final_save(output_dir: str, main_process: bool = True):
    """``with final_save(output_dir) as staging:`` write the final files into ``staging``; on success they are
    moved into ``output_dir``, on failure ``staging`` is removed and ``output_dir`` is as it was.

    Every process enters (a sharded model saves from all ranks); only ``main_process`` creates, moves and cleans.
    """
    out = Path(output_dir)
    staging = out / STAGING
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException as error:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        if full_disk(error):
            raise ConfigError(
                f"output_dir: the disk is full; the final save to {output_dir!r} failed and what was there before is "
                f"untouched; free space and rerun (with --resume_from_checkpoint true if it saved checkpoints)"
            ) from None
        raise
    if not main_process:
        return
    entries = sorted(staging.iterdir())
    foreign = foreign_files(out, [out / p.name for p in entries if (out / p.name).exists()])
    if foreign:  # appeared during the run: keep the user's file and the new model both
        kept = out / f"final-save-{os.getpid()}"
        staging.rename(kept)
        raise ConfigError(
            f"output_dir: {', '.join(p.name for p in foreign)} appeared in {output_dir!r} during the run and lenvm-rl "
            f"did not write it; the final model is in {str(kept)!r} instead: move it into place by hand"
        )
    written = {}
    for entry in entries:
        target = out / entry.name
        if entry.is_dir() and target.exists():  # a folder cannot be renamed onto a full one: swap, then delete
            old = out / f".old-{entry.name}"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            entry.rename(target)
            shutil.rmtree(old)
        else:
            os.replace(entry, target)
        written[entry.name] = fingerprint(target)
    staging.rmdir()
    previous = json.loads((out / WRITTEN).read_text()) if (out / WRITTEN).is_file() else {}
    (out / WRITTEN).write_text(json.dumps({**previous, **written}, indent=1))


def changed_setting(previous: dict, current: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """The first key (in sorted order) whose value differs between a run's saved settings (a stage's manifest in its
    output_dir: ``rollout_args.json``, ``evaluate_args.json``) and the current ones; None when they agree."""
    changed = sorted(k for k in (previous.keys() | current.keys()) - set(ignore) if previous.get(k) != current.get(k))
    return changed[0] if changed else None
