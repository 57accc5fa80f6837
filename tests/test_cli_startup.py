"""The registry commands start fast: they load MLflow's client and nothing of the training stack."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT


def test_promote_and_rollback_load_neither_prefect_nor_tensorflow() -> None:
    probe = (
        "import sys\n"
        "import flows.cli, conf, tasks.registry.hand_moves, tasks.registry.versions\n"
        "import tasks.runtime.tracking_server\n"
        "heavy = [m for m in ('prefect', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "", f"the registry commands import {done.stdout.strip()}"
