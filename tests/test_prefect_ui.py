"""The Prefect server `make serve` starts: its UI must talk to the API on the port it was given."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.servers import BIN, ROOT, free_port, tail

pytestmark = pytest.mark.slow


def test_make_prefect_server_points_its_ui_at_its_own_port(tmp_path: Path) -> None:
    port = free_port()
    make = [
        "make",
        "--no-print-directory",
        "-f",
        str(ROOT / "Makefile"),
        "-C",
        str(tmp_path),  # .prefect/ (state, log, pid) goes here, not into the checkout
        f"PREFECT_PORT={port}",
        f"VENV={BIN.parent}",
    ]
    env = {**os.environ}
    for name in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        env.pop(name, None)
    try:
        started = subprocess.run(
            [*make, "prefect-server"], env=env, capture_output=True, text=True, timeout=180
        )
        log = tail(tmp_path / ".prefect" / "server.log")
        assert started.returncode == 0, started.stdout + started.stderr + log
        # What the UI's JavaScript fetches first to learn where the API is.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as answer:
            settings = json.load(answer)
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        subprocess.run([*make, "stop-server"], env=env, capture_output=True, timeout=60)
