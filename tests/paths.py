"""Paths the tests read: the repository root, its configs and the data shipped with the tests.

One place for them, so a test file's depth under tests/ does not matter.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY_YAML = REPO / "conf" / "tiny.yaml"
COCO_YAML = REPO / "conf" / "coco.yaml"
COCO_DATA = TESTS / "data" / "coco"
