"""The GGUF (``modelfold.hf.gguf``) tests share tests/hf's tiny models."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
