"""Run the bad-input sweep of tests/test_bad_input_sweep.py and print what each case got, as markdown.

    .venv/bin/python scripts/bad_input_table.py > /tmp/table.md   (about a minute on one core)

The table in docs/errors.md is this script's output. Paths in messages are shortened to ``W/``
(the case's own folder).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


def main() -> int:
    import torch
    from test_bad_input_sweep import CASES, build_assets, observe, observe_limited

    torch.set_num_threads(1)
    rows = ["| # | bad input | via | got | message | nothing written | input unchanged |",
            "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="modelfold-sweep-") as tmp:
        os.environ["MODELFOLD_CACHE"] = str(Path(tmp) / "cache")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        assets = build_assets(Path(tmp) / "assets")
        limited = observe_limited([c for c in CASES if c.disk_limit is not None], assets, Path(tmp) / "limited")
        for i, case in enumerate(CASES, 1):
            work = Path(tmp) / ("limited" if case.disk_limit is not None else "") / case.id
            if case.disk_limit is None:
                work.mkdir()
            obs = limited[case.id] if case.disk_limit is not None else observe(case, assets, work)
            got = "no error" if obs.error == "none" else f"`{obs.error}`"
            if case.surface == "cli":
                got += f", exit {obs.exit_code}" + ("" if obs.one_line and not obs.traceback else ", NOT one line")
            msg = obs.message.replace(str(work.resolve()), "W").replace(str(work), "W").replace("|", "\\|")
            msg = msg if len(msg) <= 240 else msg[:237] + "..."
            created = [p for p in obs.created if not (case.resumable and p.startswith(case.resumable))]
            kept = f" (keeps `{case.resumable}/` to resume, as the message says)" if case.resumable and \
                len(created) < len(obs.created) else ""
            written = ("yes" if not created else "NO: " + ", ".join(created[:3])) + kept
            unchanged = "yes" if not obs.changed else "NO: " + ", ".join(obs.changed[:3])
            rows.append(f"| {i} | {case.what} | {case.surface} | {got} | {msg} | {written} | {unchanged} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
