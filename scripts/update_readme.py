"""Write the reward table generated from the `rewards.REWARDS` registry into README.md; with ``--demo SUMMARY``, also
the tables of a `make demo` run (its ``runs/demo/summary.md``, as it came out, with the machine it ran on) into the
README's first screen.

    python scripts/update_readme.py                              # the reward table (tests/test_readme.py checks it)
    python scripts/update_readme.py --demo runs/demo/summary.md  # after `make demo`: its tables, verbatim
"""

import argparse
import re
from pathlib import Path

from rewards import rewards_markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- rewards-table:start -->\n).*?(<!-- rewards-table:end -->)", re.DOTALL)
DEMO_PATTERN = re.compile(r"(<!-- demo-summary:start[^\n]*-->\n).*?(<!-- demo-summary:end -->)", re.DOTALL)


def render(text: str) -> str:
    return PATTERN.sub(lambda m: m.group(1) + rewards_markdown_table().rstrip("\n") + "\n" + m.group(2), text)


def render_demo(text: str, summary: str) -> str:
    """``text`` with the block between the demo-summary markers replaced by ``summary`` (a demo's summary.md)."""
    if not DEMO_PATTERN.search(text):
        raise SystemExit("README.md: no <!-- demo-summary:start --> ... <!-- demo-summary:end --> block; add one")
    return DEMO_PATTERN.sub(lambda m: m.group(1) + summary.strip() + "\n" + m.group(2), text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a `make demo` summary.md to show on the README's first screen")
    args = parser.parse_args()
    text = render(README.read_text())
    if args.demo is not None:
        text = render_demo(text, args.demo.read_text())
    README.write_text(text)
