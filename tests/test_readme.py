"""The README's reward table is the registry's, and its two commands exist in the Makefile."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_update_script():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_table_matches_registry():
    text = (ROOT / "README.md").read_text()
    assert load_update_script().render(text) == text, "run `python scripts/update_readme.py`"


def test_readme_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    text = (ROOT / "README.md").read_text()
    for target in ("demo", "test", "test-slow", "test-vllm"):
        assert f"make {target}" in text
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
