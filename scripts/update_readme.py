"""Write the reward table generated from the `rewards.REWARDS` registry into README.md."""

import re
from pathlib import Path

from rewards import rewards_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- rewards-table:start -->\n).*?(<!-- rewards-table:end -->)", re.DOTALL)


def render(text: str) -> str:
    return PATTERN.sub(lambda m: m.group(1) + rewards_markdown_table().rstrip("\n") + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
