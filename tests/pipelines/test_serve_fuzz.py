"""Fuzzing the served API from its own OpenAPI document (schemathesis): no request it can make
gets a 5xx. Bounded: a fixed seed, at most 15 cases per operation, 60 s."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.ray


def test_schemathesis_finds_no_server_error(served, tmp_path):
    url, _ = served
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    cmd = [st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing",
           "--max-examples", "15", "--max-time", "60", "--seed", "7", "--workers", "2", "--no-shrink",
           "--request-timeout", "60", "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)  # its cache stays there
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    report = "".join(p.read_text() for p in tmp_path.rglob("*.xml"))
    assert "/v1/segment" in report and "/v1/inpaint" in report  # both operations were exercised
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
