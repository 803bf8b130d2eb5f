"""`dtype: auto` / `bf16: auto` (lenvm_rl.precision): the CPU-flag rule both ways, the timed fallback and its
cache, the environment override, and the resolved choice that the configs and the rollout manifest record."""

import json

import pytest

from lenvm_rl import precision
from lenvm_rl.errors import ConfigError
from lenvm_rl.precision import PRECISION_ENV, auto_precision, cpu_precision, resolve_bf16, resolve_dtype

AVX2_CPU = {"fpu", "sse4_2", "avx", "avx2", "fma"}  # issue #14's EPYC: no AVX512, no AMX
AVX512_BF16_CPU = AVX2_CPU | {"avx512f", "avx512_bf16"}
AMX_CPU = AVX2_CPU | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.fixture
def cpu_with(monkeypatch):
    """``cpu_with(flags)``: auto_precision sees a CPU with these flags (None: unreadable); decided afresh."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)

    def use(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        auto_precision.cache_clear()

    yield use
    auto_precision.cache_clear()


@pytest.mark.parametrize(
    ("flags", "dtype"), [(AVX2_CPU, "float32"), (AVX512_BF16_CPU, "bfloat16"), (AMX_CPU, "bfloat16")]
)
def test_cpu_flags_decide(flags, dtype):
    chosen, reason = cpu_precision(flags)
    assert chosen == dtype
    assert reason.startswith("the CPU has no") == (dtype == "float32")


def test_unreadable_flags_time_a_matmul_once_and_cache_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LENVM_RL_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "timed_bf16_speedup", lambda: 0.01)  # emulated bf16: 100x slower
    assert cpu_precision(None)[0] == "float32"
    assert json.loads((tmp_path / "precision.json").read_text()) == {"bf16_speedup": 0.01}

    def no_timing():
        raise AssertionError("the cached answer should have been used")

    monkeypatch.setattr(precision, "timed_bf16_speedup", no_timing)
    assert cpu_precision(None)[0] == "float32"
    (tmp_path / "precision.json").write_text(json.dumps({"bf16_speedup": 1.9}))
    assert cpu_precision(None)[0] == "bfloat16"


def test_timed_speedup_is_a_positive_ratio():
    assert precision.timed_bf16_speedup(size=32, seconds=0.01) > 0


@pytest.mark.parametrize(("flags", "dtype"), [(AVX2_CPU, "float32"), (AVX512_BF16_CPU, "bfloat16")])
def test_auto_resolves_dtype_and_bf16_by_the_cpu(cpu_with, flags, dtype, capsys):
    cpu_with(flags)
    assert resolve_dtype("auto", "cpu") == dtype
    assert resolve_bf16("auto", use_cpu=True) is (dtype == "bfloat16")
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype(None, "cpu") is None
    assert capsys.readouterr().out.count("lenvm-rl precision: auto = " + dtype) == 1  # logged once per process


def test_the_environment_overrides_the_cpu(cpu_with, monkeypatch):
    cpu_with(AVX512_BF16_CPU)
    monkeypatch.setenv(PRECISION_ENV, "float32")
    assert resolve_dtype("auto", "cpu") == "float32" and not resolve_bf16("auto", use_cpu=True)
    auto_precision.cache_clear()
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(ConfigError, match=PRECISION_ENV):
        resolve_dtype("auto", "cpu")


def test_explicit_bf16_values_win_and_bad_ones_name_the_field(cpu_with):
    cpu_with(AVX2_CPU)
    assert resolve_bf16(True, use_cpu=True) and resolve_bf16("true", use_cpu=True)
    assert not resolve_bf16("false", use_cpu=True) and not resolve_bf16(False, use_cpu=True)
    cpu_with(AVX512_BF16_CPU)
    assert not resolve_bf16("auto", use_cpu=True, fp16=True)  # never both
    with pytest.raises(ConfigError, match="bf16: 'sometimes'"):
        resolve_bf16("sometimes", use_cpu=True)


@pytest.mark.parametrize(("flags", "bf16"), [(AVX2_CPU, False), (AVX512_BF16_CPU, True)])
def test_configs_record_the_resolved_bf16(cpu_with, flags, bf16, tmp_path):
    from lenvm_rl.grpo import LenVMGRPOConfig
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.train_lenvm import LenVMTrainingConfig

    cpu_with(flags)
    lenvm = LenVMTrainingConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # default: auto
    assert lenvm.bf16 is bf16 and lenvm.to_dict()["bf16"] is bf16
    grpo = LenVMGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", length_objective="none")
    assert grpo.bf16 is bf16
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("bf16: auto\nuse_cpu: true\nreport_to: none\n")
    (parsed,) = parse_recipe((LenVMTrainingConfig,), ["--config", str(recipe), "--output_dir", str(tmp_path)])
    assert parsed.bf16 is bf16
    (forced,) = parse_recipe(
        (LenVMTrainingConfig,), ["--config", str(recipe), "--output_dir", str(tmp_path), "--bf16", "false"]
    )
    assert forced.bf16 is False


@pytest.mark.parametrize(("flags", "dtype"), [(AVX2_CPU, "float32"), (AVX512_BF16_CPU, "bfloat16")])
def test_rollout_manifest_records_what_auto_became(cpu_with, flags, dtype, tiny_model_path, tmp_path):
    from conftest import rollout_args

    from lenvm_rl.rollout import run_rollouts
    from lenvm_rl.rollout_data import MANIFEST

    cpu_with(flags)
    output_dir = run_rollouts(rollout_args(tmp_path, num_prompts=2), tiny_model_path, dtype="auto")
    assert json.loads((output_dir / MANIFEST).read_text())["dtype"] == dtype
