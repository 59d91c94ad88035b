"""Run a layer-by-layer compression and die like a killed machine: ``python die_midway.py SPEC.json``.

SPEC: {"call": "fold" | "prune" | "compress", "src", "dst", "kwargs", "die_at": layer}. When the run
reaches the fold of layer ``die_at``, the process SIGKILLs itself (no Python clean-up, no atexit, a
write in flight in the writer thread): what an OOM kill or a lost machine does to a run.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    import modelfold.hf.checkpoint.layers as layers
    from modelfold.hf.checkpoint import compress_checkpoint, fold_checkpoint, prune_checkpoint

    fold_one = layers.fold_one

    def dying(source, plan, layer_fn, i, sd, groups):
        if i == spec["die_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return fold_one(source, plan, layer_fn, i, sd, groups)

    layers.fold_one = dying
    kwargs = spec["kwargs"]
    if "calibration" in kwargs:
        kwargs["calibration"] = torch.tensor(kwargs["calibration"])
    call = {"fold": fold_checkpoint, "prune": prune_checkpoint, "compress": compress_checkpoint}
    call[spec["call"]](spec["src"], spec["dst"], **kwargs)
    sys.exit(3)  # the kill did not happen
