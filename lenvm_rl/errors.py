"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(ValueError):
    """A bad recipe field, dataset, path or model: the message names the field and the fix."""
