"""Calibrated compression of transformers models: calibration data (``data``), the blocks and what flows
between them (``blocks``), the per-layer math (``layer``), the per-layer step (``step``), the automatic
budget (``sensitivity``) and the in-memory entry point with its options (``compress``)."""
