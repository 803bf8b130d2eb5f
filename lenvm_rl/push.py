"""`lenvm-rl push PATH --hub_model_id <user>/<name>`: upload a trained run's model and its card, after the fact.

The folder's kind (adapter, LenVM, full policy), what is uploaded and how Hub failures read are ``hub.push_folder``'s,
the same call a recipe's ``push_to_hub: true`` makes at the end of training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lenvm_rl.errors import ConfigError
from lenvm_rl.hub import push_folder


@dataclass
class PushArguments:
    """Where ``push`` uploads to (the folder itself is the first positional argument).

    Parameters:
        hub_model_id (`str` or `None`, *optional*, defaults to `None`):
            The Hub repo, ``<user or org>/<name>``; required.
        private (`bool` or `None`, *optional*, defaults to `None`):
            Create the repo private; no effect on a repo that exists.
        revision (`str` or `None`, *optional*, defaults to `None`):
            The branch to push to, created if missing; `None` pushes to main.
    """

    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo to push to: <user or org>/<name>."})
    private: bool | None = field(default=None, metadata={"help": "Create the repo private (no effect if it exists)."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to push to (created if missing); default main."}
    )


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl push PATH --hub_model_id <user>/<name> [--private true] [--revision BRANCH]`"""
    from lenvm_rl.recipe import parse_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            parse_recipe((PushArguments,), argv)
        raise ConfigError("push: give the folder to push first: `lenvm-rl push PATH --hub_model_id <user>/<name>`")
    path, (args,) = argv[0], parse_recipe((PushArguments,), argv[1:])
    if not args.hub_model_id:
        raise ConfigError(f"hub_model_id: say where to push; `lenvm-rl push {path} --hub_model_id <user>/<name>`")
    url = push_folder(path, args.hub_model_id, private=args.private, revision=args.revision)
    print(f"pushed {path} to {args.hub_model_id}: {url}")
