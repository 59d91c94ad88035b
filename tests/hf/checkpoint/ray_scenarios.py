"""The Ray side of ``test_on_ray.py``, run as child processes.

``python ray_scenarios.py die SRC WORK``: a Ray fold of ``SRC/llama`` into ``WORK/resumed`` whose driver
SIGKILLs itself once two layers are recorded as done (a driver lost mid-run).
``python ray_scenarios.py run SRC WORK``: resumes that fold, then folds, prunes, folds by the CLI and
fails on NaN weights, all with ``executor="ray"``.

Ray can end its driver process from its own threads (``_exit(1)`` when the local raylet dies, for one),
which must not end the pytest session without a report, so no Ray driver runs in the pytest process.
Every outcome that Python sees, errors included, is written to ``WORK/result.json``; a run that leaves
no ``result.json`` died under Ray, and the test fails with Ray's logs (it is not retried).
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
OUTPUTS = ("fold_ray", "prune_ray", "cli_ray", "resumed")  # subdirectories of WORK these scripts write
DIE_AFTER = 2  # layers recorded before the "die" driver kills itself


def _init() -> None:
    import os

    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as fold_on_ray does for a cluster it starts itself

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False,
             object_store_memory=100 * 2**20)


def die(src: Path, work: Path) -> None:
    """Start the Ray fold of ``resumed`` and SIGKILL this driver once ``DIE_AFTER`` layers are recorded."""
    import os
    import signal
    import time

    import modelfold.hf.checkpoint.on_ray as on_ray
    from modelfold.hf.checkpoint import fold_checkpoint
    from modelfold.hf.checkpoint.resume import partial_path

    part = partial_path(work / "resumed")

    def gather(*args, **kw):
        while len(list(part.glob("layer-*.json"))) < DIE_AFTER:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    on_ray.gather = gather
    _init()
    fold_checkpoint(src / "llama", work / "resumed", executor="ray", **FOLD)


def run(src: Path, work: Path) -> dict:
    """Resume the killed fold; fold, prune, fold by the CLI and fail on NaN weights, all with ``executor="ray"``."""
    import ray

    from modelfold.cli import main
    from modelfold.hf.checkpoint import fold_checkpoint, prune_checkpoint

    _init()
    try:
        resumed = fold_checkpoint(src / "llama", work / "resumed", executor="ray", **FOLD)
        (work / "killed").unlink(missing_ok=True)  # the next fold's layer-1 worker is killed once
        report = fold_checkpoint(src / "llama", work / "fold_ray", executor="ray", **FOLD)
        out: dict = {"fold": {"groups": [[g.root, g.channels_after] for g in report.groups],
                              "params_after": report.params_after, "executor": report.info["executor"]},
                     "resumed_layers": resumed.info.get("resumed_layers", 0)}
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
    mode, src_dir, work_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "die":
        die(src_dir, work_dir)
        sys.exit(3)  # the driver was not killed
    try:
        result = run(src_dir, work_dir)
    except BaseException:  # a Python-level failure is a result too: the test reports it, no retry
        result = {"error": traceback.format_exc()}
    tmp = work_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(work_dir / "result.json")
