"""The Ray side of ``test_distributed.py``, run as a child process: ``python ray_scenarios.py SRC WORK``.

Ray can end its driver process from its own threads (``_exit(1)`` when the local raylet dies, for one).
On CI (stop 15) the test session ended inside this module with exit status 1 and no report, while a Ray
driver was live in the pytest process. Here no Ray driver ever runs in the pytest process: such a death is
only this child's death, and the test shows Ray's logs and tries once more.

Every outcome that Python sees, errors included, is written to ``WORK/result.json``; a run that leaves
no ``result.json`` died under Ray.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

FOLD = {"ratio": {0: 0.25, 1: {"mlp": 0.5, "attention": 0.5}, 3: 0.5},  # non-uniform: sizes in the config
        "max_shard_size": "30KB", "progress": False}
PRUNE = {"ratio": 0.5, "norm": 1, "targets": "all", "progress": False}
CLI = ["--ratio", "0.3", "--executor", "ray", "--ray-cpus", "1", "--ray-memory", "200MB"]
SOURCES = ("llama", "qwen2", "nan")  # subdirectories of SRC the test writes
OUTPUTS = ("fold_ray", "prune_ray", "cli_ray")  # subdirectories of WORK this script writes


def run(src: Path, work: Path) -> dict:
    """Fold, prune, fold by the CLI and fail on NaN weights, all with ``executor="ray"``."""
    import ray

    from modelfold.cli import main
    from modelfold.hf.stream import fold_checkpoint, prune_checkpoint

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False,
             object_store_memory=100 * 2**20)
    try:
        report = fold_checkpoint(src / "llama", work / "fold_ray", executor="ray", **FOLD)
        out: dict = {"fold": {"groups": [[g.root, g.channels_after] for g in report.groups],
                              "params_after": report.params_after, "executor": report.info["executor"]}}
        prune_checkpoint(src / "qwen2", work / "prune_ray", executor="ray", **PRUNE)
        out["cli_rc"] = main(["fold", str(src / "qwen2"), *CLI, "--out", str(work / "cli_ray")])
        try:
            fold_checkpoint(src / "nan", work / "nan_out", ratio=0.3, progress=False, executor="ray")
            out["nan_error"] = None
        except Exception as e:  # the test asserts which error, and its message
            out["nan_error"] = [type(e).__name__, str(e)]
    finally:
        ray.shutdown()
    return out


if __name__ == "__main__":
    src_dir, work_dir = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        result = run(src_dir, work_dir)
    except BaseException:  # a Python-level failure is a result too: the test reports it, no retry
        result = {"error": traceback.format_exc()}
    tmp = work_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(work_dir / "result.json")
