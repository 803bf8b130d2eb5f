"""lenvm-rl: teach LLMs to hit token budgets with RL, using a Length Value Model as the length critic."""

__version__ = "0.1.0"
