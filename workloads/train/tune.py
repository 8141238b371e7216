"""Ray Tune sweeps over LoRA hyperparameters: every trial is an SFT (or DPO) run on Ray Train, and
ASHA stops the unpromising ones early.

    python ray_jobs/tune_lora.py --config ray_jobs/configs/tune_lora/sft-cpu.yaml
    ray job submit --working-dir . -- python ray_jobs/tune_lora.py --config ray_jobs/configs/tune_lora/sft-8b.yaml

The sweep starts from a job config (`base_config`: an SFT or preference YAML, with `base_overrides`)
and a search space over its keys, in Tune's distributions:

    search_space:
      lora.r: {choice: [8, 16, 32]}
      lora.alpha_over_r: {choice: [1, 2]}        # alpha = r x this (rsLoRA-style scaling sweeps)
      lora.dropout: {uniform: [0.0, 0.1]}
      lora.target_modules: {choice: [all-linear, [q_proj, v_proj]]}
      train.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
      train.warmup_ratio: {grid: [0.0, 0.1]}

Every key is checked against the job's own config before Ray starts (a misspelt key fails, naming
it). The data stage runs once on the driver (`_stages/tokenized` or `_stages/pairs`) and every
trial trains on it. A trial is Tune's function trainable that builds the job's `TorchTrainer` with
Tune's `TuneReportCallback`: each checkpoint's report (eval loss, or the held-out DPO metrics) reaches
Tune, so ASHA compares trials at the same step and stops the worst. PBT (`scheduler.type: pbt`)
restarts the worst trials from the best ones' latest Ray Train checkpoints with perturbed values
(`TrainCheckpointPBT`). Trials come from Tune's variant generator or Optuna, and run
`max_concurrent_trials` at a time, by default as many as the cluster's CPUs and GPUs hold.

Outputs:
  trials/          trials.csv (one row per trial: its sampled config, best metric, steps run,
                   stopped early or not) and curves.png (the metric against step, one line each)
  best/            the best trial's best checkpoint as a servable adapter folder
  _manifest.json   the table, the best trial and its config, steps run against the full budget
An interrupted sweep (the driver killed, a retried RayJob) continues with `Tuner.restore`: finished
trials are kept, unfinished ones resume from their last checkpoint. Tune does not save the
scheduler's state, so after a restore ASHA's rungs (or PBT's records) hold only what is reported
from then on.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import random
import urllib.parse
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from ray.tune.schedulers import PopulationBasedTraining

from workloads.common.config import (
    ConfigError,
    JobConfig,
    OutputConfig,
    StrictModel,
    apply_override,
    load_config,
)
from workloads.common.documents import list_input_files
from workloads.common.manifest import JobFailed, JobManifest, finish_job
from workloads.common.ray_runtime import init_ray
from workloads.common.storage import OutputLayout
from workloads.train.config import project_file
from workloads.train.ray_train import (
    check_cluster_fits,
    export_model,
    storage_path,
    torch_trainer,
    worker_group_resources,
    write_rejects,
)

log = logging.getLogger(__name__)

ALPHA_OVER_R = "lora.alpha_over_r"
# Keys a sweep may not vary: the data stage (tokenized with the model's tokenizer) is shared by
# every trial, and where a trial's output and checkpoints go is the sweep's business.
FIXED_PREFIXES = ("data.", "model.", "output.", "storage_path", "ray.", "checkpoint.", "scaling.")
# What PBT may change mid-run. It continues a trial from another's checkpoint with new values, so
# nothing that changes the adapter's shape or what it was trained on; the learning rate and warmup
# take effect on resume (ray_train.make_schedule_callback), dropout when the model is rebuilt.
PBT_MUTABLE = ("train.learning_rate", "train.warmup_ratio", "lora.dropout")


# ---------------------------------------------------------------------------------------------
# Config


class Distribution(StrictModel):
    """One of Tune's sampling distributions; exactly one key."""

    choice: list[Any] | None = Field(default=None, description="tune.choice: one of these.")
    grid: list[Any] | None = Field(
        default=None, description="tune.grid_search: every value, crossed with the other grids."
    )
    uniform: tuple[float, float] | None = Field(default=None, description="tune.uniform(lo, hi).")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="tune.loguniform(lo, hi): learning rates."
    )
    randint: tuple[int, int] | None = Field(
        default=None, description="tune.randint(lo, hi): an integer in [lo, hi)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of choice, grid, uniform, loguniform, randint, not "
                f"{given or 'none'}"
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind}: give at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: [lo, hi] needs lo < hi, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform: lo must be > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    def values_to_check(self) -> list[Any]:
        """Values that stand for the whole range when the job config validates them."""
        value = getattr(self, self.kind)
        return list(value)

    def to_mutation(self):
        """PBT's resampling distribution for this key (a list for discrete values)."""
        if self.kind in ("choice", "grid"):
            return list(getattr(self, self.kind))
        return self.to_tune()

    def to_tune(self):
        from ray import tune

        value = getattr(self, self.kind)
        return {
            "choice": lambda: tune.choice(value),
            "grid": lambda: tune.grid_search(value),
            "uniform": lambda: tune.uniform(*value),
            "loguniform": lambda: tune.loguniform(*value),
            "randint": lambda: tune.randint(*value),
        }[self.kind]()

    def size(self) -> int | None:
        """How many distinct values; None for a continuous range."""
        if self.kind in ("choice", "grid"):
            return len(getattr(self, self.kind))
        if self.kind == "randint":
            return self.randint[1] - self.randint[0]
        return None


class SchedulerConfig(StrictModel):
    type: Literal["asha", "pbt", "fifo"] = Field(
        default="asha",
        description="asha: successive halving, stopping the worst trials at each rung (Li et al. "
        "2020); pbt: population-based training, copying the best trials' checkpoints into the "
        "worst and perturbing their hyperparameters (Jaderberg et al. 2017); fifo: every trial "
        "runs to the end (a plain random or grid search).",
    )
    grace_period: int = Field(
        default=10,
        ge=1,
        description="ASHA: optimizer steps every trial runs before it can be stopped (its first "
        "rung). Put a checkpoint (checkpoint.every_steps of the base config) on it.",
    )
    reduction_factor: float = Field(
        default=2,
        gt=1,
        description="ASHA: keep the best 1/this of the trials at each rung (Ray's default is 4; "
        "2 suits sweeps of under 10 trials).",
    )
    perturbation_interval: int = Field(
        default=20,
        ge=1,
        description="PBT: steps between exploit/explore decisions; a multiple of the base "
        "config's checkpoint.every_steps, since a trial continues from another's checkpoint.",
    )
    quantile_fraction: float = Field(
        default=0.25,
        gt=0,
        le=0.5,
        description="PBT: the bottom fraction of trials that copy one of the top fraction.",
    )


class SearchConfig(StrictModel):
    algorithm: Literal["random", "grid", "optuna"] = Field(
        default="random",
        description="random: Tune's variant generator (grid keys crossed, the rest sampled "
        "num_samples times); grid: every combination once (every distribution must be a grid); "
        "optuna: Optuna's TPE sampler (Tune's OptunaSearch).",
    )
    num_samples: int = Field(
        default=8, ge=1, description="Trials (random, optuna); per grid combination with grids."
    )
    seed: int = Field(default=0, description="Seed of the sampler.")


class LoraSweepConfig(JobConfig):
    job: Literal["sft", "dpo"] = Field(
        description="What every trial runs: sft (workloads.train.sft; metric eval_loss) or dpo "
        "(workloads.train.preference, algorithm dpo; metric heldout/reward_accuracy)."
    )
    base_config: str = Field(
        description="The job's YAML every trial starts from (ray_jobs/configs/sft/... or "
        "ray_jobs/configs/preference/...)."
    )
    base_overrides: list[str] = Field(
        default_factory=list, description="key=value overrides of the base config, for every trial."
    )
    search_space: dict[str, Distribution] = Field(
        description="Base-config key -> distribution. `lora.alpha_over_r` sets lora.alpha to "
        "lora.r x the sampled value."
    )
    metric: str | None = Field(
        default=None,
        description="What the sweep optimises, as Ray Train reports it. Default: eval_loss (sft), "
        "heldout/reward_accuracy (dpo).",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None, description="Default: min for a loss, max otherwise."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    max_concurrent_trials: int | Literal["auto"] = Field(
        default="auto",
        description="Trials at once. auto: as many as the cluster's CPUs and GPUs hold now (each "
        "trial needs scaling.num_workers x scaling.resources_per_worker of the base config); on an "
        "autoscaling cluster set a number, since it starts small.",
    )
    output: OutputConfig
    storage_path: str | None = Field(
        default=None,
        description="Where Tune and Ray Train keep the sweep's state and checkpoints (s3:// on a "
        "multi-node cluster). Default: <output.path>/_ray_tune.",
    )

    @field_validator("base_config")
    @classmethod
    def _base_exists(cls, value: str) -> str:
        path = project_file(value)
        if not path.is_file():
            raise ValueError(f"no config file at {value!r}")
        return str(path.resolve())

    @field_validator("max_concurrent_trials")
    @classmethod
    def _positive(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("give a number >= 1 or auto")
        return value

    @model_validator(mode="after")
    def _space_fits_the_job(self) -> LoraSweepConfig:
        if not self.search_space:
            raise ValueError("search_space: give at least one key to sweep")
        base = self.base_job()  # the base config itself must validate
        for key, dist in self.search_space.items():
            if key.startswith(FIXED_PREFIXES):
                raise ValueError(
                    f"search_space.{key}: data, model, output, checkpoint, scaling and Ray "
                    "settings are the sweep's, shared by every trial (the data is tokenized once, "
                    "with the model's tokenizer); set them in base_config/base_overrides"
                )
            if key == ALPHA_OVER_R:
                for v in dist.values_to_check():
                    if not isinstance(v, (int, float)) or v <= 0:
                        raise ValueError(f"search_space.{key}: {v!r} is not a positive number")
                continue
            typed = []
            for value in dist.values_to_check():
                try:
                    job = self.base_job([f"{key}={json.dumps(value)}"])
                except ConfigError as exc:
                    errors = [line.strip(" -") for line in str(exc).splitlines()[1:]]
                    raise ValueError(
                        f"search_space.{key}={value!r}: the {self.job} config refuses it: "
                        + ("; ".join(errors) or str(exc))
                    ) from None
                typed.append(_dotted_get(job.model_dump(mode="json"), key))
            if dist.kind in ("choice", "grid"):
                # As the job reads them: YAML reads `1e-5` (no dot) as a string, the job a float.
                setattr(dist, dist.kind, typed)
        if base.method == "full" and any(k.startswith("lora.") for k in self.search_space):
            raise ValueError(
                "search_space: lora.* keys need a base config with method lora or qlora"
            )
        if self.job == "dpo" and base.algorithm != "dpo":
            raise ValueError(
                f"job: dpo needs a base config with algorithm dpo, not {base.algorithm}"
            )
        if not base.train.max_steps:
            raise ValueError(
                "base_config: set train.max_steps, the budget ASHA's rungs are cut from"
            )
        if base.checkpoint.every_steps > base.train.max_steps:
            raise ValueError(
                "base_config: checkpoint.every_steps is beyond train.max_steps, so a trial would "
                "report once, at its end: nothing for a scheduler to compare early"
            )
        eval_steps = base.train.eval_steps or base.checkpoint.every_steps
        if base.checkpoint.every_steps % eval_steps:
            raise ValueError(
                f"base_config: train.eval_steps ({eval_steps}) does not divide "
                f"checkpoint.every_steps ({base.checkpoint.every_steps}), so some checkpoints "
                "would report an older eval: the schedulers would rank trials by it and Ray "
                "Train would keep checkpoints by it"
            )
        if self.job == "dpo" and base.preference.reference == "precomputed":
            raise ValueError(
                "base_config: preference.reference=precomputed runs a reference pass per job; "
                "trials of a sweep use the online reference (set preference.reference=online)"
            )
        if not base.data.eval_fraction:
            raise ValueError(
                "base_config: data.eval_fraction is 0, so trials have no held-out metric to compare"
            )
        if self.search.algorithm == "grid" and any(
            d.kind != "grid" for d in self.search_space.values()
        ):
            raise ValueError(
                "search.algorithm: grid needs every search_space entry as {grid: [...]}"
            )
        if self.search.algorithm == "optuna" and any(
            d.kind == "grid" for d in self.search_space.values()
        ):
            raise ValueError("search.algorithm: optuna samples; use choice instead of grid")
        if self.scheduler.type == "pbt":
            fixed = [k for k in self.search_space if k not in PBT_MUTABLE]
            if fixed:
                raise ValueError(
                    f"scheduler.type: pbt continues a trial from another's checkpoint with new "
                    f"values, so it can only vary {list(PBT_MUTABLE)}; {fixed} change the "
                    "adapter's shape or what it was trained on: use asha"
                )
            if self.search.algorithm == "optuna":
                raise ValueError(
                    "search.algorithm: optuna cannot follow PBT, which changes a trial's values "
                    "mid-run; use random"
                )
            if self.scheduler.perturbation_interval % base.checkpoint.every_steps:
                raise ValueError(
                    f"scheduler.perturbation_interval: {self.scheduler.perturbation_interval} is "
                    f"not a multiple of the base config's checkpoint.every_steps "
                    f"({base.checkpoint.every_steps}), so a trial would continue from a "
                    "checkpoint older than the score PBT chose it by"
                )
        return self

    def fingerprint_payload(self) -> dict[str, Any]:
        """The sweep's identity (its stages, its Tune experiment): the base job's validated
        content, not the path of its YAML, so an edit to that file starts a new sweep and a copy
        of the repository elsewhere (`ray job submit --working-dir`) continues the same one."""
        payload = self.model_dump(
            mode="json", exclude={"ray", "output", "base_config", "base_overrides"}
        )
        payload["base_job"] = self.base_job().model_dump(
            mode="json", exclude={"ray", "output", "storage_path"}
        )
        return payload

    # -- the base job -------------------------------------------------------------------------

    def base_job(self, extra: list[str] | None = None):
        return load_config(
            job_config_class(self.job), self.base_config, [*self.base_overrides, *(extra or [])]
        )

    def bounds(self) -> dict[str, tuple[float, float]]:
        """The range of each continuous (or integer range) entry of the search space."""
        out = {}
        for key, dist in self.search_space.items():
            if dist.kind in ("uniform", "loguniform"):
                out[key] = tuple(getattr(dist, dist.kind))
            elif dist.kind == "randint":
                out[key] = (dist.randint[0], dist.randint[1] - 1)
        return out

    def expected_trials(self) -> int:
        """Trials the search makes: num_samples per combination of the grid entries."""
        grids = [d.size() for d in self.search_space.values() if d.kind == "grid"]
        return math.prod(grids) * (
            1 if self.search.algorithm == "grid" else self.search.num_samples
        )

    @property
    def objective(self) -> tuple[str, str]:
        metric = self.metric or ("eval_loss" if self.job == "sft" else "heldout/reward_accuracy")
        mode = self.mode or ("min" if "loss" in metric else "max")
        return metric, mode


def _dotted_get(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def job_config_class(job: str):
    if job == "sft":
        from workloads.train.sft import SFTJobConfig

        return SFTJobConfig
    from workloads.train.preference.config import PreferenceJobConfig

    return PreferenceJobConfig


def trial_overrides(sampled: dict[str, Any], base_lora_r: int) -> list[str]:
    """The sampled values as overrides of the base config (`lora.alpha_over_r` becomes lora.alpha)."""
    out = [f"{k}={json.dumps(v)}" for k, v in sampled.items() if k != ALPHA_OVER_R]
    if ALPHA_OVER_R in sampled:
        r = sampled.get("lora.r", base_lora_r)
        out.append(f"lora.alpha={json.dumps(float(r) * float(sampled[ALPHA_OVER_R]))}")
    return out


# ---------------------------------------------------------------------------------------------
# One trial: Tune's function trainable, driving one Ray Train run


def lora_trial(config: dict[str, Any]) -> None:
    """Build the trial's job config (the base job's, validated on the driver, with the sampled
    values applied), then run the job's recipe in a TorchTrainer whose reports reach Tune through
    `TuneReportCallback`.

    The Ray Train run is named after the trial, so a trial that Tune restarts (a failure, or
    `Tuner.restore` of an interrupted sweep) continues its own run from its latest checkpoint.
    When PBT has handed this trial another trial's checkpoint (Tune's checkpoint of the trial,
    see `TrainCheckpointPBT`), it starts a new run seeded from that checkpoint instead."""
    import ray.tune

    tree = copy.deepcopy(config["base_job"])
    for override in trial_overrides(config["sampled"], tree["lora"]["r"]):
        apply_override(tree, override)
    name = f"{config['name']}-{ray.tune.get_context().get_trial_id()}"
    seed = ray.tune.get_checkpoint()
    if seed is not None:
        uri = checkpoint_uri(seed.path, config["storage"])
        tree["checkpoint"]["resume_from"] = uri
        seed_key = f"{uri}#{config.get('exploit', 0)}"
        name += "-from-" + hashlib.sha256(seed_key.encode()).hexdigest()[:8]
        print(f"trial {name}: continuing from {uri} with {config['sampled']}", flush=True)
    cfg = job_config_class(config["job"]).model_validate(tree)
    loop, loop_config = _recipe(config["job"], cfg, config["data_uri"])
    trainer = torch_trainer(
        loop,
        loop_config,
        name=name,
        scaling=cfg.scaling,
        checkpointing=cfg.checkpoint,
        storage=config["storage"],
        callbacks=[objective_report_callback(config["objective"][0])],
        keep_best=tuple(config["objective"]),
        # Under PBT another trial may start from any of this one's checkpoints: keep them all.
        keep_all=config["keep_all_checkpoints"],
    )
    trainer.fit()


def objective_report_callback(metric: str):
    """Tune's `TuneReportCallback`, forwarding the reports that carry the sweep's metric. The
    recipe's last report (every worker's peak memory, kept in the Ray Train run) has none, and
    Tune fails a trial whose result lacks the metric its scheduler or searcher ranks by."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReportCallback()


def checkpoint_uri(path: str, storage: str) -> str:
    """A checkpoint path as Ray Train reports it (within the storage's filesystem: `bucket/key` on
    S3) as a URI that names that filesystem again."""
    scheme = urllib.parse.urlparse(storage).scheme
    if scheme and scheme != "file" and "://" not in path:
        return f"{scheme}://{path}"
    return path


def _recipe(job: str, cfg, data_uri: str):
    if job == "sft":
        from workloads.train.sft import train_loop_per_worker

        return train_loop_per_worker, {
            "cfg": cfg.model_dump(mode="json"),
            "tokenized": data_uri,
            "has_eval": True,
        }
    from workloads.train.preference.recipes import TRAIN_LOOPS

    return TRAIN_LOOPS[cfg.algorithm], {
        "cfg": cfg.model_dump(mode="json"),
        "pairs": data_uri,
        "reference": None,
        "reference_splits": [],
    }


# ---------------------------------------------------------------------------------------------
# The sweep


def concurrent_trials(cfg: LoraSweepConfig, base) -> int:
    """`max_concurrent_trials`, with `auto` as many trials as the cluster's resources hold now."""
    if cfg.max_concurrent_trials != "auto":
        return cfg.max_concurrent_trials
    import ray

    have = ray.cluster_resources()
    need = worker_group_resources(base.scaling)
    fits = min(math.floor(have.get(k, 0) / v) for k, v in need.items() if v > 0)
    if fits < 1:
        raise JobFailed(
            f"one trial needs {need} (scaling of base_config) and this Ray has "
            f"{ {k: have.get(k, 0) for k in need} }: lower scaling.num_workers"
        )
    return fits


def _scheduler(cfg: LoraSweepConfig, max_steps: int, storage: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric, mode = cfg.objective
    s = cfg.scheduler
    if s.type == "asha":
        return ASHAScheduler(
            time_attr="step",
            metric=metric,
            mode=mode,
            max_t=max_steps,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.type == "pbt":
        return TrainCheckpointPBT(
            storage=storage,
            time_attr="step",
            metric=metric,
            mode=mode,
            perturbation_interval=s.perturbation_interval,
            quantile_fraction=s.quantile_fraction,
            hyperparam_mutations={
                "sampled": {k: d.to_mutation() for k, d in cfg.search_space.items()}
            },
            custom_explore_fn=functools.partial(clamp_to_space, bounds=cfg.bounds()),
        )
    return FIFOScheduler()


def clamp_to_space(config: dict[str, Any], bounds: dict[str, tuple[float, float]]) -> dict:
    """PBT's perturbation multiplies a continuous value by 0.8 or 1.2 with no bound: keep it in
    its distribution's range (a warmup ratio over 1 would fail the trial's config)."""
    for key, (lo, hi) in bounds.items():
        if key in config["sampled"]:
            value = min(max(config["sampled"][key], lo), hi)
            config["sampled"][key] = round(value) if isinstance(lo, int) else value
    return config


class TrainCheckpointPBT(PopulationBasedTraining):
    """Tune's PBT, handing trials the checkpoints their Ray Train runs wrote.

    PBT copies a top trial's latest Tune checkpoint into a bottom one. A trial that drives Ray
    Train through `TuneReportCallback` never has one: the callback reports each Ray Train
    checkpoint's path as a metric and leaves the files where Ray Train wrote them. So this PBT
    takes, as a trial's checkpoint, the latest Ray Train checkpoint it reported; an exploited
    trial finds it as `ray.tune.get_checkpoint()` and seeds a new Ray Train run from it
    (`lora_trial`). Everything else, the quantiles, the resampling and the restarts, is Tune's."""

    def __init__(self, *, storage: str, **kwargs):
        super().__init__(**kwargs)
        self._storage = storage
        self._train_checkpoints: dict[Any, str] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("checkpoint_path"):
            self._train_checkpoints[trial] = checkpoint_uri(
                result["checkpoint_path"], self._storage
            )
        return super().on_trial_result(tune_controller, trial, result)

    def _get_new_config(self, trial, trial_to_clone):
        # Numbered, so a trial cloned twice from the same checkpoint starts a new Ray Train run
        # each time instead of resuming the first one (lora_trial names the run after it).
        new_config, operations = super()._get_new_config(trial, trial_to_clone)
        new_config["exploit"] = self._num_perturbations + 1
        return new_config, operations

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
        from ray.train import Checkpoint

        state = self._trial_state[trial]
        path = self._train_checkpoints.get(trial) if trial in upper_quantile else None
        state.last_checkpoint = Checkpoint(path) if path else None
        if path:
            self._num_checkpoints += 1
        if trial in lower_quantile:
            donor = random.choice(upper_quantile)
            if self._trial_state[donor].last_checkpoint is None:
                log.info("PBT: trial %s has no checkpoint yet; %s carries on", donor, trial)
                return
            self._exploit(tune_controller, trial, donor)


def _search(cfg: LoraSweepConfig, concurrent: int):
    """The search algorithm, holding at most `concurrent` trials at once. (Tune applies
    `TuneConfig.max_concurrent_trials` only to a search algorithm it builds itself or to a
    `Searcher`; the variant generator given here must carry the limit.)"""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = cfg.objective
        searcher = OptunaSearch(metric=metric, mode=mode, seed=cfg.search.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrent)


def run_sweep(cfg: LoraSweepConfig, base, data_uri: str, storage: str, name: str, fresh: bool):
    """Start the sweep, or continue it from its state in `storage` after an interruption
    (`fresh`: output.mode overwrite, start again)."""
    from ray import tune

    from workloads.common.storage import resolve_filesystem

    # A trial's own process only waits on its TorchTrainer, whose workers ask for the CPUs and
    # GPUs. Tune refuses an empty request, so it holds a token MiB of Ray's logical memory: a CPU
    # held per trial would leave the last trial's workers waiting for one that never frees.
    trainable = tune.with_resources(lora_trial, {"CPU": 0, "memory": 2**20})
    experiment = posixpath.join(storage, name)
    if fresh and tune.Tuner.can_restore(experiment):
        fs, path = resolve_filesystem(experiment)
        fs.delete_dir(path)
        print(f"output.mode=overwrite: starting the sweep in {experiment} again", flush=True)
    if tune.Tuner.can_restore(experiment):
        print(f"continuing the sweep in {experiment}", flush=True)
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        metric, mode = cfg.objective
        param_space = {
            "sampled": {k: d.to_tune() for k, d in cfg.search_space.items()},
            # The base job as validated here: trials on other nodes never read the YAML again.
            "base_job": base.model_dump(mode="json"),
            "job": cfg.job,
            "objective": [metric, mode],
            "data_uri": data_uri,
            "storage": storage,
            "name": name,
            "keep_all_checkpoints": cfg.scheduler.type == "pbt",
        }
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # No metric here: the scheduler and searcher carry it.
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(cfg, base.train.max_steps, storage),
                search_alg=_search(cfg, concurrent_trials(cfg, base)),
                num_samples=1 if cfg.search.algorithm == "grid" else cfg.search.num_samples,
                # Tune names a trial's folder after its config, the whole base job included when
                # a searcher proposes it: the trial id is enough (trials.csv has the values).
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=base.checkpoint.max_failures),
                verbose=1,
            ),
        )
    # On SIGINT (Ctrl-C) Tune would stop "gracefully" and return the trials it has
    # as if the sweep were done. Let the interrupt raise instead, so the job fails and is not
    # recorded as finished; Tune saves the experiment's state as it goes, and the same command
    # continues it (Tuner.restore, above).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    grid = tuner.fit()
    expected = cfg.expected_trials()
    if len(grid) < expected or grid.num_terminated + grid.num_errors < len(grid):
        raise JobFailed(
            f"the sweep stopped with {grid.num_terminated + grid.num_errors} of {expected} trials "
            "finished: run the same command again to continue it"
        )
    return grid


def trials_table(
    result_grid, cfg: LoraSweepConfig, max_steps: int, storage: str
) -> list[dict[str, Any]]:
    """One row per trial: its sampled values, best metric and at which step, steps run, early stop."""
    metric, mode = cfg.objective
    rows = []
    for result in result_grid:
        df = result.metrics_dataframe
        curve = []
        if df is not None and metric in df and "step" in df:
            curve = [
                (int(s), float(v)) for s, v in zip(df["step"], df[metric], strict=True) if v == v
            ]
        best = (min if mode == "min" else max)(curve, key=lambda p: p[1]) if curve else None
        steps = int(df["step"].max()) if df is not None and "step" in df else 0
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id") if result.metrics else None,
                "config": result.config["sampled"],
                f"best_{metric}": best[1] if best else None,
                "best_step": best[0] if best else None,
                "steps_run": steps,
                "stopped_early": result.error is None and steps < max_steps,
                "error": str(result.error)[:300] if result.error else None,
                "curve": curve,
                "checkpoints": _checkpoints(df, metric, storage),
            }
        )
    return rows


def _checkpoints(df, metric: str, storage: str) -> list[tuple[str, float]]:
    if df is None or "checkpoint_path" not in df or metric not in df:
        return []
    return [
        (checkpoint_uri(p, storage), float(v))
        for p, v in zip(df["checkpoint_path"], df[metric], strict=True)
        if isinstance(p, str) and v == v
    ]


def write_trials(rows: list[dict], cfg: LoraSweepConfig, folder: str, fs) -> dict[str, str]:
    metric, _ = cfg.objective
    keys = list(cfg.search_space)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(
        ["trial_id", *keys, f"best_{metric}", "best_step", "steps_run", "stopped_early", "error"]
    )
    for row in rows:
        writer.writerow(
            [row["trial_id"], *(_cell(row["config"].get(k)) for k in keys)]
            + [row[f"best_{metric}"], row["best_step"], row["steps_run"], row["stopped_early"]]
            + [row["error"] or ""]
        )
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(posixpath.join(folder, "trials.csv")) as f:
        f.write(text.getvalue().encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for row in rows:
        if row["curve"]:
            label = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row["config"].items())
            style = "--" if row["stopped_early"] else "-"
            ax.plot(*zip(*row["curve"], strict=True), style, marker="o", markersize=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early by {cfg.scheduler.type})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    with fs.open_output_stream(posixpath.join(folder, "curves.png")) as f:
        f.write(png.getvalue())
    return {
        "trials_csv": posixpath.join(folder, "trials.csv"),
        "curves_png": posixpath.join(folder, "curves.png"),
    }


def _cell(value: Any) -> Any:
    """A sampled value as a CSV cell: scalars as they are, lists as JSON."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "+".join(str(v).removesuffix("_proj") for v in value)
    return str(value)


def best_trial(rows: list[dict], cfg: LoraSweepConfig) -> dict[str, Any]:
    metric, mode = cfg.objective
    scored = [r for r in rows if r[f"best_{metric}"] is not None]
    if not scored:
        raise JobFailed(f"no trial reported {metric}: see the trials' errors in trials/trials.csv")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: r[f"best_{metric}"])


def export_best(row: dict, cfg: LoraSweepConfig, folder: str, fs) -> dict[str, Any]:
    """The best trial's best kept checkpoint, as the adapter folder vLLM loads."""
    from ray.train import Checkpoint

    _, mode = cfg.objective
    kept = [(p, v) for p, v in row["checkpoints"] if _exists(p)]
    if not kept:
        raise JobFailed(f"trial {row['trial_id']}: none of its checkpoints is left in storage")
    path, value = (min if mode == "min" else max)(kept, key=lambda pv: pv[1])
    files = export_model(Checkpoint(path), folder, fs)
    return {"checkpoint": path, "metric": value, "files": files}


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    from workloads.common.storage import resolve_filesystem

    fs, p = resolve_filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def run(cfg: LoraSweepConfig) -> JobManifest:
    manifest = JobManifest("tune_lora", cfg)
    base = cfg.base_job()
    files = list_input_files(base.data)
    if cfg.job == "sft":
        from workloads.train.sft import TOKENIZED_SCHEMA as schema
        from workloads.train.sft import check_tokenizer
        from workloads.train.sft import tokenize_stage as prepare

        data_stage = "_stages/tokenized"
    else:
        from workloads.train.preference.job import PAIRS_SCHEMA as schema
        from workloads.train.preference.job import check_tokenizer
        from workloads.train.preference.job import prepare_stage as prepare

        data_stage = "_stages/pairs"
    check_tokenizer(base)
    fingerprint = cfg.fingerprint()
    out = OutputLayout(cfg.output.path, fingerprint, overwrite=cfg.output.mode == "overwrite")
    init_ray(cfg.ray, dashboard=True)
    check_cluster_fits(cfg.ray, base.scaling)  # a trial that cannot fit would wait forever

    counts = out.run_stage(
        data_stage, lambda folder: prepare(base, out, files, folder), manifest
    ).info
    manifest.read = counts["read"]
    manifest.kept = counts["train"] + counts["eval"]
    manifest.rejected = counts["rejected"]
    if counts["train"] == 0:
        raise JobFailed(f"no usable record among {counts['read']} read: see rejects/")
    out.run_stage(
        "rejects", lambda folder: write_rejects(out, folder, schema, data_stage), manifest
    )

    max_steps = base.train.max_steps
    storage = storage_path(
        cfg.storage_path or posixpath.join(cfg.output.path.rstrip("/"), "_ray_tune"),
        cfg.output.path,
    )
    name = f"tune-lora-{fingerprint}"

    def sweep(folder: str) -> dict:
        grid = run_sweep(
            cfg, base, out.uri_of(data_stage), storage, name, cfg.output.mode == "overwrite"
        )
        rows = trials_table(grid, cfg, max_steps, storage)
        outputs = write_trials(rows, cfg, folder, out.fs)
        return {"rows": rows, "outputs": outputs, "experiment": posixpath.join(storage, name)}

    swept = out.run_stage("trials", sweep, manifest).info
    rows = swept["rows"]
    best = best_trial(rows, cfg)
    exported = out.run_stage(
        "best", lambda folder: export_best(best, cfg, folder, out.fs), manifest
    ).info
    metric, mode = cfg.objective
    steps_run = sum(r["steps_run"] for r in rows)
    manifest.outputs.update(swept["outputs"])
    manifest.outputs["best"] = out.path("best")
    manifest.extra = {
        "objective": {"metric": metric, "mode": mode},
        "experiment": swept["experiment"],
        "trials": [{k: v for k, v in r.items() if k not in ("curve", "checkpoints")} for r in rows],
        "best": {
            "trial_id": best["trial_id"],
            "config": best["config"],
            metric: best[f"best_{metric}"],
            "checkpoint": exported["checkpoint"],
            "adapter": out.path("best"),
        },
        "trial_steps_run": steps_run,
        "trial_steps_budget": max_steps * len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
    }
    print(
        f"best trial {best['trial_id']}: {metric}={best[f'best_{metric}']:.4f} -> {out.path('best')}"
    )
    return finish_job(manifest, out, cfg.output.keep_intermediate)
