"""Where a drill test leaves what it measured, for ``scripts/drills`` to tabulate.

``record(name, figures)`` writes ``$KILN_DRILLS_OUT/<name>.json`` when that variable
is set (``scripts/drills`` sets it) and does nothing otherwise, so the tests run the
same under plain pytest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(name: str, figures: dict) -> None:
    """Keep one test's measured figures (counts, seconds) for the drill table."""
    out = os.environ.get("KILN_DRILLS_OUT")
    if not out:
        return
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, sort_keys=True))
    os.replace(tmp, path)
