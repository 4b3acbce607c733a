"""Progress bars on stderr for long work; silent when stderr is not a terminal (CI logs stay clean)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def byte_progress(total: int, description: str) -> Iterator[Any]:
    from tqdm import tqdm

    # disable=None turns the bar off on non-TTY stderr; CONVNEXTV2_PROGRESS=0 turns it off everywhere.
    disable = None if os.environ.get("CONVNEXTV2_PROGRESS", "1") != "0" else True
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
              leave=False, disable=disable) as bar:
        yield bar
