"""`ray job submit` against a real head node started with `ray start --head` on free ports.

This is the path every cluster user takes (local head, a VM cluster, KubeRay's RayJob), so it runs
the job exactly as the README says: the repo as working dir, the entrypoint as a command line.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO
from tests.integration.ray_head import RAY, cli_env
from tests.integration.ray_head import ray_head as start_ray_head
from workloads.data.sample import score_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head():
    with start_ray_head() as head:
        yield head.dashboard_address


def _submit(address: str, *job_args: str) -> subprocess.CompletedProcess:
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "ray_jobs/dedup_exact.py",
        "--config",
        "ray_jobs/configs/dedup_exact/local.yaml",
        "ray.data_progress_bars=false",
        *job_args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=600, cwd=REPO)


def test_dedup_exact_through_ray_job_submit(ray_head, sample_corpus, tmp_path):
    out = tmp_path / "submitted"
    result = _submit(ray_head, f"input.path={sample_corpus / 'corpus'}", f"output.path={out}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    assert "dedup_exact summary" in result.stdout  # the job's own table, streamed back

    manifest = json.loads((out / "_manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["reconciled"]
    assert counts["read"] == counts["kept"] + sum(counts["dropped"].values()) + sum(
        counts["rejected"].values()
    )

    truth = json.loads((sample_corpus / "planted.json").read_text())
    rows = {name: (planted, found) for name, planted, found in score_output(truth, out)}
    assert rows["duplicates: exact"][0] == rows["duplicates: exact"][1] > 0
    assert sum(counts["rejected"].values()) == len(truth["malformed"])


def test_a_misspelt_key_fails_the_job_before_any_work(ray_head, tmp_path):
    out = tmp_path / "never"
    result = _submit(
        ray_head, "input.path=/nonexistent", f"output.path={out}", "normalize.lowercse=true"
    )
    assert result.returncode != 0
    logs = result.stdout + result.stderr
    assert "normalize.lowercse" in logs and "did you mean 'normalize.lowercase'" in logs
    assert not out.exists()
