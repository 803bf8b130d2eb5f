"""`lenvm-rl length-tokens`: residual statistics against a hand-computed case, and the stage end to end."""

import json

import pytest
import torch

from lenvm_rl.errors import ConfigError
from lenvm_rl.length_tokens import LengthTokenArguments, main, ranked, token_residual_stats
from lenvm_rl.modeling import LenVMModel


def test_residual_statistics_hand_case(tokenizer):
    # γ = 0.5; "ab" then EOS with V(s_0) = -0.75, V(s_1) = -0.2, V(s_2) := 0 (terminal; the stored 9.0 is ignored):
    # s_0 = -(1 - 0.5) + 0.5 * (-0.2) + 0.75 = 0.15 (token "a", shortens); s_1 = -0.5 + 0 + 0.2 = -0.3 ("b", lengthens).
    ids = tokenizer("ab", add_special_tokens=False)["input_ids"]
    rows = [{"completion_ids": ids, "completion_tokens": 2}, {"completion_ids": ids[:1], "completion_tokens": 1}]
    # second rollout "a" alone: s_0 = -0.5 + 0 - (-0.52) = 0.02, inside the threshold
    values = [torch.tensor([-0.75, -0.2, 9.0]), torch.tensor([-0.52, 0.0])]
    stats = token_residual_stats(values, rows, tokenizer, gamma=0.5, threshold=0.1)
    assert stats["a"] == pytest.approx(
        {"count": 2, "up": 1, "down": 0, "up_rate": 0.5, "down_rate": 0.0, "mean_residual": 0.085}
    )
    assert stats["b"] == pytest.approx(
        {"count": 1, "up": 0, "down": 1, "up_rate": 0.0, "down_rate": 1.0, "mean_residual": -0.3}
    )
    assert [text for text, _ in ranked(stats, "up", min_count=1, top=5)] == ["a"]
    assert ranked(stats, "down", min_count=2, top=5) == []  # "b" is seen once


def test_stage_writes_table_json_and_plot(rollouts_dir, tokenizer, tmp_path):
    lenvm = tmp_path / "lenvm"
    torch.manual_seed(0)
    from conftest import make_tiny_llama

    model = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.8)
    with torch.no_grad():
        model.head.out.weight.normal_(std=1.0)  # values that move from token to token
    model.save_pretrained(lenvm)
    tokenizer.save_pretrained(lenvm)
    out = tmp_path / "out"
    result = main(
        [
            "--lenvm_model_path",
            str(lenvm),
            "--rollouts_path",
            str(rollouts_dir),
            "--output_dir",
            str(out),
            "--threshold",
            "0.01",
            "--min_count",
            "1",
        ]
    )
    assert sum(s["count"] for s in result["tokens"].values()) > 0
    assert json.loads((out / "length_tokens.json").read_text())["tokens"] == result["tokens"]
    assert "| token | seen | passes |" in (out / "length_tokens.md").read_text()
    assert (out / "length_tokens.png").stat().st_size > 5_000


def test_bad_threshold_names_the_field():
    with pytest.raises(ConfigError, match="threshold"):
        LengthTokenArguments(threshold=0.0)
