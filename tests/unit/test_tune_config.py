"""The LoRA sweep's config without Ray: search-space keys checked against the job they sweep,
distributions, scheduler rules, and how sampled values become a trial's overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.common.config import ConfigError, load_config
from workloads.train.tune import Distribution, LoraSweepConfig, clamp_to_space, trial_overrides

CPU_SWEEP = REPO / "ray_jobs" / "configs" / "tune_lora" / "sft-cpu.yaml"


def _space(space: dict) -> str:
    return "search_space=" + json.dumps(space)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([_space({"lora.rank": {"choice": [4]}})], "lora.rank"),  # misspelt: the SFT config says so
        ([_space({"lora.r": {"choice": [0]}})], "search_space.lora.r=0"),  # r >= 1 in LoraConfig
        ([_space({"data.max_length": {"choice": [64]}})], "search_space.data.max_length"),
        ([_space({"lora.r": {"choice": [4], "grid": [8]}})], "exactly one"),
        ([_space({"train.learning_rate": {"loguniform": [0, 1e-3]}})], "lo must be > 0"),
        ([_space({"train.learning_rate": {"uniform": [1e-3, 1e-4]}})], "lo < hi"),
        ([_space({"lora.alpha_over_r": {"choice": [-1]}})], "lora.alpha_over_r"),
        (["scheduler.type=pbt"], "scheduler.type: pbt"),  # the CPU space sweeps lora.r
        (
            [
                "scheduler.type=pbt",
                "search.algorithm=optuna",
                _space({"lora.dropout": {"uniform": [0, 0.1]}}),
            ],
            "search.algorithm: optuna",
        ),
        (
            # checkpoints every 5 steps in the CPU config
            [
                "scheduler.type=pbt",
                "scheduler.perturbation_interval=7",
                _space({"lora.dropout": {"uniform": [0, 0.1]}}),
            ],
            "scheduler.perturbation_interval",
        ),
        (["search.algorithm=grid"], "search.algorithm: grid"),
        (["base_overrides=[train.max_steps=3]"], "checkpoint.every_steps"),
        (["base_overrides=[data.eval_fraction=0]"], "data.eval_fraction"),
        (["base_config=nowhere.yaml"], "base_config"),
        ([_space({"model.name_or_path": {"choice": ["a", "b"]}})], "search_space.model"),
        (["base_overrides=[train.eval_steps=15]"], "train.eval_steps"),  # checkpoints every 20
        (["max_concurrent_trials=0"], "max_concurrent_trials"),
    ],
)
def test_bad_sweeps_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(LoraSweepConfig, CPU_SWEEP, overrides)


def test_the_shipped_sweep_validates_and_optimises_eval_loss():
    cfg = load_config(LoraSweepConfig, CPU_SWEEP)
    assert cfg.objective == ("eval_loss", "min")
    assert cfg.base_job().scaling.num_workers == 1 and cfg.base_job().train.max_steps == 30


def test_pbt_over_continuous_keys_validates():
    cfg = load_config(
        LoraSweepConfig,
        CPU_SWEEP,
        ["scheduler.type=pbt", _space({"train.learning_rate": {"loguniform": [1e-4, 1e-3]}})],
    )
    assert cfg.scheduler.type == "pbt"


def test_alpha_over_r_follows_the_sampled_rank():
    assert trial_overrides({"lora.r": 8, "lora.alpha_over_r": 2}, base_lora_r=16) == [
        "lora.r=8",
        "lora.alpha=16.0",
    ]
    assert trial_overrides({"lora.alpha_over_r": 1}, base_lora_r=16) == ["lora.alpha=16.0"]
    assert trial_overrides({"lora.target_modules": ["q_proj"]}, 16) == [
        'lora.target_modules=["q_proj"]'
    ]


def test_distribution_sizes():
    assert Distribution(choice=[1, 2, 3]).size() == 3
    assert Distribution(randint=(2, 5)).size() == 3
    assert Distribution(loguniform=(1e-4, 1e-3)).size() is None


def test_discrete_values_take_the_job_configs_types():
    # YAML reads 1e-5 (no dot) as a string; the sweep hands trials the float the job reads.
    space = {
        "train.learning_rate": {"grid": ["1e-5", 3.0e-3]},
        "lora.target_modules": {"choice": ["all-linear", ["q_proj", "v_proj"]]},
    }
    cfg = load_config(LoraSweepConfig, CPU_SWEEP, [_space(space)])
    assert cfg.search_space["train.learning_rate"].grid == [1.0e-5, 3.0e-3]
    assert cfg.search_space["lora.target_modules"].choice == ["all-linear", ["q_proj", "v_proj"]]


def test_a_dpo_sweep_refuses_a_precomputed_reference():
    with pytest.raises(ConfigError, match="preference.reference"):
        load_config(
            LoraSweepConfig,
            REPO / "ray_jobs" / "configs" / "tune_lora" / "dpo-cpu.yaml",
            [
                "base_overrides=[train.max_steps=30, checkpoint.every_steps=10, preference.reference=precomputed]"
            ],
        )


def test_pbt_perturbations_stay_in_their_ranges():
    cfg = load_config(
        LoraSweepConfig,
        CPU_SWEEP,
        [
            "scheduler.type=pbt",
            _space(
                {
                    "train.warmup_ratio": {"uniform": [0.0, 0.2]},
                    "lora.dropout": {"uniform": [0.0, 0.1]},
                }
            ),
        ],
    )
    bounds = cfg.bounds()
    assert bounds == {"train.warmup_ratio": (0.0, 0.2), "lora.dropout": (0.0, 0.1)}
    perturbed = {"sampled": {"train.warmup_ratio": 0.24, "lora.dropout": -0.01}, "other": 1}
    assert clamp_to_space(perturbed, bounds) == {
        "sampled": {"train.warmup_ratio": 0.2, "lora.dropout": 0.0},
        "other": 1,
    }
    assert clamp_to_space({"sampled": {"k": 9.6}}, {"k": (1, 8)}) == {"sampled": {"k": 8}}


def test_the_sweeps_identity_is_the_base_jobs_content_not_its_path(tmp_path):
    cfg = load_config(LoraSweepConfig, CPU_SWEEP)
    copy = tmp_path / "lora-cpu.yaml"
    copy.write_text(Path(cfg.base_config).read_text())
    moved = load_config(LoraSweepConfig, CPU_SWEEP, [f"base_config={copy}"])
    assert moved.fingerprint() == cfg.fingerprint()
    copy.write_text(Path(cfg.base_config).read_text().replace("dropout: 0.05", "dropout: 0.07"))
    edited = load_config(LoraSweepConfig, CPU_SWEEP, [f"base_config={copy}"])
    assert edited.fingerprint() != cfg.fingerprint()
