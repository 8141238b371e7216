"""Every YAML in ray_jobs/configs and serve_configs loads and validates, and opens with its command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from workloads.common.config import DataJobConfig, JobConfig, load_config

JOB_CONFIGS = sorted((REPO / "ray_jobs" / "configs").glob("*/*.yaml"))
SERVE_CONFIGS = sorted((REPO / "serve_configs").glob("*.yaml"))


def _entrypoint(config: Path) -> str:
    """The job that the config's header command runs: `python ray_jobs/<job>.py --config <config>`."""
    header = config.read_text().split("\n\n")[0]
    match = re.search(r"ray_jobs/(\w+)\.py --config (\S+)", header)
    assert match, f"{config.relative_to(REPO)}: open with the command that runs it"
    assert match.group(2) == str(config.relative_to(REPO)), (
        f"{config.relative_to(REPO)}: header names {match.group(2)}"
    )
    return match.group(1)


def _config_model(job: str) -> type[JobConfig]:
    """The JobConfig subclass that the entrypoint ray_jobs/<job>.py passes to run_job."""
    path = REPO / "ray_jobs" / f"{job}.py"
    assert path.is_file(), f"no entrypoint ray_jobs/{job}.py"
    spec = importlib.util.spec_from_file_location(f"_entrypoint_{job}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the entrypoint's work is behind `if __name__ == "__main__"`
    models = {
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, JobConfig) and v is not JobConfig
    }
    assert len(models) == 1, (
        f"ray_jobs/{job}.py should import exactly one JobConfig, found {models}"
    )
    return models.pop()


def test_there_are_job_configs():
    assert JOB_CONFIGS


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_job_config_validates(path: Path):
    model = _config_model(_entrypoint(path))
    cfg = load_config(model, path)
    if isinstance(cfg, DataJobConfig):  # every data job is pointed at data the same way
        assert cfg.input.path and cfg.output.path


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_serve_config_validates_against_ray_serve_schema(path: Path):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
