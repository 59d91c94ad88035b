"""The traced-CNN engine: model -> channel groups -> plan -> merge / select -> refit -> result.

``groups`` (channel-group discovery on Torch-Pruning's graph) -> ``planners`` (k-means fold, magnitude
and activation selection) -> ``engine`` (per group: describe, verify, plan, merge, remove) ->
``repair/`` (AR, DIR, R) or ``calibrator`` (least-squares refit; ``sources``: calibration inputs,
``budget`` + ``sensitivity``: automatic budgets) -> ``pipeline.run_traced`` (the whole run behind
``modelfold.fold`` / ``prune`` / ``compress``). ``baselines/``: IFM, neuron merging.
"""
