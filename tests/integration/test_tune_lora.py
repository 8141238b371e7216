"""LoRA sweeps on a real local Ray: Ray Tune trials that each drive a Ray Train SFT run through
TuneReportCallback, ASHA stopping trials early on eval loss, the best adapter exported, and an
interrupted sweep continued with Tuner.restore.

Each sweep runs as the command a user types (`python ray_jobs/tune_lora.py`), in its own process
with its own local Ray: Ray Train removes a finished trial's placement group through its
PlacementGroupCleaner, which needs the dashboard's state API, and the shared test session runs
without a dashboard. Every sweep runs while that session is up, as in CI: with two Rays on the
machine, the state API cannot guess which one is meant (see workloads.common.ray_runtime)."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.common.config import load_config
from workloads.train.tune import LoraSweepConfig

pytestmark = pytest.mark.slow

CONFIG = REPO / "ray_jobs" / "configs" / "tune_lora" / "sft-cpu.yaml"
MAX_STEPS = 12
LEARNING_RATES = (3.0e-3, 1.0e-3, 1.0e-5, 3.0e-6)
SAMPLES = len(LEARNING_RATES)


@pytest.fixture(scope="module")
def instructions(ray_session, tmp_path_factory) -> Path:
    from workloads.train.sft import make_instructions

    path = tmp_path_factory.mktemp("tune-data") / "instructions.jsonl"
    make_instructions(path, limit=160)
    return path


def sweep_overrides(
    tiny_model: Path, data: Path, out: Path, learning_rates: tuple[float, ...] = LEARNING_RATES
) -> list[str]:
    """A grid over the learning rate, in this order: with 2 trials at a time, the two good rates set
    ASHA's bar at each rung and the two low ones fall below it, deterministically."""
    return [
        "base_overrides="
        + json.dumps(
            [
                f"model.name_or_path={tiny_model}",
                f"data.path={data}",
                "data.max_length=128",
                "data.eval_fraction=0.1",
                f"train.max_steps={MAX_STEPS}",
                "train.batch_size=8",
                "train.logging_steps=3",
                "train.eval_steps=3",
                "checkpoint.every_steps=3",
                "checkpoint.num_to_keep=1",
                "checkpoint.max_failures=0",
                "lora.merge=false",
                "deepspeed.config=null",
                "scaling.num_workers=1",
            ]
        ),
        "search_space="
        + json.dumps(
            {"lora.r": {"grid": [8]}, "train.learning_rate": {"grid": list(learning_rates)}}
        ),
        "search.algorithm=grid",
        "scheduler.grace_period=3",
        "scheduler.reduction_factor=2",
        f"output.path={out}",
    ]


def run_cli(overrides: list[str], config: Path = CONFIG, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "ray_jobs" / "tune_lora.py"),
            "--config",
            str(config),
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )


class Manifest:
    def __init__(self, out: Path):
        self.extra = json.loads((out / "_manifest.json").read_text())["extra"]


@pytest.fixture(scope="module")
def sweep(tiny_model, instructions, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "sweep"
    overrides = sweep_overrides(tiny_model, instructions, out)
    load_config(LoraSweepConfig, CONFIG, overrides)  # the same overrides validate here
    done = run_cli(overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"-> {out / 'best'}" in done.stdout  # the best adapter's path is printed
    return overrides, out, Manifest(out)


def test_every_trial_is_reported_and_asha_stops_some_early(sweep):
    _, out, manifest = sweep
    trials = manifest.extra["trials"]
    assert len(trials) == SAMPLES
    assert all(t["error"] is None for t in trials)
    assert all(t["best_eval_loss"] is not None for t in trials)
    # ASHA compares at steps 3 and 6 and keeps the better half: fewer steps than running them all.
    assert manifest.extra["stopped_early"] >= 1
    assert (
        manifest.extra["trial_steps_run"]
        < manifest.extra["trial_steps_budget"]
        == SAMPLES * MAX_STEPS
    )
    assert any(t["steps_run"] == MAX_STEPS for t in trials)
    rows = list(csv.DictReader((out / "trials" / "trials.csv").open()))
    assert len(rows) == SAMPLES and {"lora.r", "train.learning_rate", "best_eval_loss"} <= set(
        rows[0]
    )
    assert (out / "trials" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_the_best_trial_is_exported_as_an_adapter(sweep, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, manifest = sweep
    best = manifest.extra["best"]
    trials = manifest.extra["trials"]
    assert best["eval_loss"] == min(t["best_eval_loss"] for t in trials)
    # The exported checkpoint is the best trial's own, from the step of its best eval loss.
    row = next(t for t in trials if t["trial_id"] == best["trial_id"])
    checkpoint = Path(best["checkpoint"])
    assert checkpoint.parent.name.endswith(best["trial_id"])
    state = json.loads((checkpoint / "checkpoint" / "trainer_state.json").read_text())
    assert state["global_step"] == row["best_step"]
    adapter = out / "best"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == best["config"]["lora.r"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.allclose(tuned, base)


def test_an_interrupted_sweep_continues_with_tuner_restore(tiny_model, instructions, tmp_path):
    """Interrupt the sweep's driver (SIGINT, as Ctrl-C or `ray job stop` do) once a trial has
    finished, then run the same command again: Tune restores the experiment, keeps the finished
    trial and runs only what is left."""
    out = tmp_path / "sweep"
    overrides = [
        *sweep_overrides(tiny_model, instructions, out, learning_rates=LEARNING_RATES[:3]),
        "max_concurrent_trials=1",
        "scheduler.type=fifo",
    ]
    driver = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "ray_jobs" / "tune_lora.py"),
            "--config",
            str(CONFIG),
            *overrides,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    experiment = out / "_ray_tune"
    deadline = time.monotonic() + 600
    finished: list[str] = []
    while time.monotonic() < deadline and driver.poll() is None:
        finished = _finished_trials(experiment)
        if finished:
            break
        time.sleep(1)
    driver.send_signal(signal.SIGINT)
    returncode = driver.wait(timeout=120)
    assert finished, "no trial finished before the deadline"
    assert len(_finished_trials(experiment)) < 3, "the sweep ended before the interruption"
    # The interrupted job failed; it did not report the partial sweep as done.
    assert returncode != 0 and not (out / "_manifest.json").exists()
    kept = {
        p: p.read_text()
        for t in finished
        for p in experiment.glob(f"tune-lora-*/trial_{t}/result.json")
    }
    assert len(kept) == len(finished) and all(f'"step": {MAX_STEPS}' in x for x in kept.values())

    done = run_cli(overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "continuing the sweep" in done.stdout + done.stderr
    trials = {t["trial_id"]: t for t in Manifest(out).extra["trials"]}
    assert len(trials) == 3 and all(t["steps_run"] == MAX_STEPS for t in trials.values())
    assert set(finished) <= set(trials)  # the trial finished before the interruption is kept
    for path, text in kept.items():  # ... as it was: not run again
        assert path.read_text() == text


def _finished_trials(experiment: Path) -> list[str]:
    """Trial ids that Tune's latest saved experiment state records as terminated (what a restore
    will keep), after they reported the last step."""
    states = sorted(experiment.glob("tune-lora-*/experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):  # being written
        return []
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def test_pbt_continues_the_worst_trial_from_the_best_ones_checkpoint(
    tiny_model, instructions, tmp_path
):
    """PBT on two trials: at each perturbation the worse one is restarted from the better one's
    latest Ray Train checkpoint with a perturbed learning rate, and carries on from that step."""
    out = tmp_path / "sweep"
    overrides = [
        *sweep_overrides(tiny_model, instructions, out, learning_rates=(3.0e-3, 1.0e-5)),
        "search_space=" + json.dumps({"train.learning_rate": {"grid": [3.0e-3, 1.0e-5]}}),
        "search.algorithm=random",
        "search.num_samples=1",
        "scheduler.type=pbt",
        "scheduler.perturbation_interval=3",
        "scheduler.quantile_fraction=0.5",
        "max_concurrent_trials=2",
    ]
    done = run_cli(overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = Manifest(out).extra["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert all(t["steps_run"] == MAX_STEPS for t in trials)  # PBT stops nothing

    # The exploited trial's new Ray Train run, seeded from the other trial's checkpoint.
    storage = out / "_ray_tune"
    seeded = sorted(storage.glob("tune-lora-*-from-*"))
    assert seeded, f"no trial was continued from another's checkpoint: {sorted(storage.iterdir())}"
    donors = re.findall(r"continuing from (\S+) with", done.stdout)
    assert len(donors) == len(seeded)
    assert any(_history(Path(d))[-1]["step"] < MAX_STEPS for d in donors)  # one before the end
    for donor in donors:
        # The seeded run's history starts with the donor's: its weights, optimizer and step.
        donor_history = _history(Path(donor))
        run = next(
            r
            for r in seeded
            if _first_checkpoint(r) is not None
            and _history(_first_checkpoint(r))[: len(donor_history)] == donor_history
        )
        donor_step = donor_history[-1]["step"]
        if donor_step < MAX_STEPS:  # it trains on from the donor's step
            assert _history(_first_checkpoint(run))[-1]["step"] > donor_step
        else:  # exploited at the last perturbation: nothing left to train, the result reported again
            assert _history(_first_checkpoint(run))[-1]["step"] == donor_step == MAX_STEPS

    # Every report's learning rate is its trial's current rate on the shared schedule: after an
    # exploit the trial trains at its new rate, not at the donor's. A trial exploited at the last
    # step trains nothing and reports its donor's final rows again, marked as such.
    factors: dict[int, list[float]] = {}
    for result in storage.glob("tune-lora-*/*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            if "learning_rate" in row and not row.get("reported_again"):
                rate = float(row["config"]["sampled"]["train.learning_rate"])
                factors.setdefault(row["step"], []).append(row["learning_rate"] / rate)
    assert len(factors) == MAX_STEPS // 3
    for step, values in factors.items():
        assert max(values) == pytest.approx(min(values), rel=1e-5), (step, values)


def _first_checkpoint(run: Path) -> Path | None:
    """The earliest checkpoint_* a Ray Train run wrote (their names sort by time)."""
    found = sorted(run.glob("checkpoint_*"))
    return found[0] if found else None


def _history(checkpoint: Path) -> list[dict]:
    """The Trainer's log history saved in a Ray Train checkpoint."""
    state = json.loads((checkpoint / "checkpoint" / "trainer_state.json").read_text())
    return state["log_history"]


def test_a_dpo_sweep_with_optuna_maximises_held_out_reward_accuracy(
    ray_session, tiny_model, tmp_path
):
    """Trials that each run the DPO job, proposed by Optuna's TPE sampler, ranked by the held-out
    reward accuracy the preference recipe reports."""
    from workloads.train.preference.job import make_pairs

    data = tmp_path / "preferences.jsonl"
    make_pairs(data, limit=120)
    out = tmp_path / "sweep"
    config = REPO / "ray_jobs" / "configs" / "tune_lora" / "dpo-cpu.yaml"
    base = [
        f"model.name_or_path={tiny_model}",
        f"data.path={data}",
        "data.eval_fraction=0.2",
        "train.max_steps=6",
        "train.eval_steps=3",
        "checkpoint.every_steps=3",
        "checkpoint.num_to_keep=1",
        "checkpoint.max_failures=0",
        "deepspeed.config=null",
        "scaling.num_workers=1",
    ]
    overrides = [
        "base_overrides=" + json.dumps(base),
        "search.num_samples=2",
        "scheduler.type=fifo",
        "max_concurrent_trials=2",
        f"output.path={out}",
    ]
    done = run_cli(overrides, config=config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = Manifest(out)
    assert manifest.extra["objective"] == {"metric": "heldout/reward_accuracy", "mode": "max"}
    trials = manifest.extra["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert trials[0]["config"] != trials[1]["config"]
    accuracy = [t["best_heldout/reward_accuracy"] for t in trials]
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    best = manifest.extra["best"]
    assert best["heldout/reward_accuracy"] == max(accuracy)
    adapter = json.loads((out / "best" / "adapter_config.json").read_text())
    assert adapter["r"] == best["config"]["lora.r"]
    # Tune kept Optuna's state with the experiment (a restored sweep goes on with the same study).
    assert list((out / "_ray_tune").glob("tune-lora-*/searcher-state-*.pkl"))
