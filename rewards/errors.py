"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2.

Defined here, in the leaf package, because rewards raise it too (a bad reward parameter, a missing column) and
``rewards`` imports nothing from ``lenvm_rl``; ``lenvm_rl.errors`` re-exports it (docs/DESIGN.md §2.4).
"""


class ConfigError(ValueError):
    """A bad recipe field, dataset, path or model: the message names the field and the fix."""
