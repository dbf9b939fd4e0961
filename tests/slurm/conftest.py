"""A private single-node SLURM cluster for the whole session, started and torn down by slurm/local/*.sh.

Needs root and the Debian packages slurmctld slurmd slurm-client munge. Without them the tests skip, unless
LONGVL_REQUIRE_SLURM=1 (CI sets it), which turns the skip into a failure. LONGVL_KEEP_SLURM_STATE=1 keeps
the cluster's state and logs dir (path printed) for a post-mortem.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from slurm_cluster_lib import REPO, Cluster

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(slurm_cluster: Cluster) -> Iterator[None]:
    yield
    slurm_cluster.cancel_submitted()


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return f"the local SLURM cluster needs root (euid {os.geteuid()})"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)")
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    reason = _missing_prerequisite()
    if reason:
        if os.environ.get("LONGVL_REQUIRE_SLURM") == "1":
            pytest.fail(f"LONGVL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # Under /tmp, not pytest's tmp dir: munged needs every directory above its socket executable by all.
    state_dir = Path(tempfile.mkdtemp(prefix="longvl-slurm-", dir="/tmp"))
    env = {**os.environ, "SLURM_CONF": str(state_dir / "slurm.conf")}
    stop_env = {**os.environ, "KEEP_STATE": os.environ.get("LONGVL_KEEP_SLURM_STATE", "0")}
    try:
        subprocess.run([str(REPO / "slurm/local/start.sh"), str(state_dir)], check=True, timeout=60,
                       env={**os.environ, "PYTHON": sys.executable})
        yield Cluster(state_dir, env)
    finally:
        subprocess.run([str(REPO / "slurm/local/stop.sh"), str(state_dir)], env=stop_env, timeout=60)
        if stop_env["KEEP_STATE"] == "1":
            print(f"SLURM state and logs kept in {state_dir}")
