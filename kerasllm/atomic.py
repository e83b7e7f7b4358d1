"""Files written whole or not at all (TensorFlow-free: the token cache writes with it before Keras loads)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON under a temporary name and rename it: never a torn file."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
