"""Image-model evaluation: top-1 on labelled images, agreement and KL between two models.

Shipped images (no download): foolbox's 20 labelled ImageNet samples and scikit-image's sample
photos (five 224-pixel crops each, unlabelled), or the Fashion-MNIST test set for the zoo models.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..assets import IMAGENET_MEAN, IMAGENET_STD, package_dir
from ..errors import CheckpointError, ModelFoldError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHIPPED = ("imagenet", "fmnist")


def _to_tensor(img: object, size: int, mean: tuple[float, ...], std: tuple[float, ...],
               crops: bool = False) -> list[torch.Tensor]:
    """Resize the short side to ``size * 8/7``, then the center crop (and with ``crops`` the 4 corner crops)."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = round(size * 8 / 7) / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    boxes = [((w - size) // 2, (h - size) // 2)]
    if crops:
        boxes += [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size)]
    m = torch.tensor(mean)[:, None, None]
    sd = torch.tensor(std)[:, None, None]
    out = []
    for left, top in boxes:
        c = img.crop((left, top, left + size, top + size))
        x = torch.frombuffer(bytearray(c.tobytes()), dtype=torch.uint8).view(size, size, 3)
        out.append((x.permute(2, 0, 1).float() / 255 - m) / sd)
    return out


def _label(path: Path) -> int:
    """Class index from the file name (``name_243.jpg``) or an integer parent folder (``243/x.jpg``); else -1."""
    m = re.search(r"_(\d+)$", path.stem)
    if m:
        return int(m.group(1))
    return int(path.parent.name) if path.parent.name.isdigit() else -1


def image_folder(folder: str | os.PathLike, size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, crops: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image under ``folder`` (recursively, sorted): (N, 3, size, size) normalized, labels (-1: unknown)."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"image folder {folder} does not exist; pass a folder of images or one of "
                              f"{', '.join(SHIPPED)}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CheckpointError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    xs, ys = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                views = _to_tensor(img, size, mean, std, crops)
        except (OSError, UnidentifiedImageError) as e:
            raise CheckpointError(f"cannot read image {f}: {e}; remove it or convert it") from None
        xs += views
        ys += [_label(f)] * len(views)
    return torch.stack(xs), torch.tensor(ys)


def imagenet_images(crops: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 labelled ImageNet samples, then scikit-image's sample photos (label -1; 5 crops with ``crops``)."""
    from PIL import Image

    fb = sorted((package_dir("foolbox", "foolbox==3.3.4") / "data").glob("imagenet_*.jpg"))
    if not fb:
        raise CheckpointError("foolbox's data/imagenet_*.jpg sample images are missing; reinstall foolbox==3.3.4")
    xs, ys = [], []
    for f in fb:
        with Image.open(f) as img:
            xs += _to_tensor(img, 224, IMAGENET_MEAN, IMAGENET_STD)
        ys.append(_label(f))
    x1, y1 = torch.stack(xs), torch.tensor(ys)
    sk = package_dir("skimage", "scikit-image==0.26.0") / "data"
    photos = sorted(p for p in sk.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    if not photos:
        return x1, y1
    xs = []
    for p in photos:
        with Image.open(p) as img:
            xs += _to_tensor(img, 224, IMAGENET_MEAN, IMAGENET_STD, crops)
    x2 = torch.stack(xs)
    return torch.cat([x1, x2]), torch.cat([y1, torch.full((len(x2),), -1)])


def load_images(spec: str | os.PathLike, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``"imagenet"`` (shipped samples), ``"fmnist"`` (Fashion-MNIST test set) or an image folder."""
    if str(spec) == "imagenet":
        x, y = imagenet_images()
    elif str(spec) == "fmnist":
        from ..datasets import fashion_mnist

        try:
            x, y = fashion_mnist("test")
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
    else:
        x, y = image_folder(spec)
    return (x[:limit], y[:limit]) if limit else (x, y)


@torch.inference_mode()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, progress: bool, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            try:
                y = model(x[i:i + batch_size].to(device))
            except RuntimeError as e:
                raise ModelFoldError(f"the model does not accept these images (shape {tuple(x.shape[1:])}): {e}. "
                                     "Pass images of the size and channels it was trained on") from None
            if not isinstance(y, torch.Tensor) or y.ndim != 2:
                raise ModelFoldError(f"{type(model).__name__} does not return (batch, classes) logits; top-1 "
                                     "and agreement need an image classifier")
            out.append(y.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def image_agreement(model_a: nn.Module, model_b: nn.Module | None = None,
                    images: str | os.PathLike | torch.Tensor = "imagenet", labels: torch.Tensor | None = None,
                    batch_size: int = 32, progress: bool = False) -> dict:
    """Top-1 of ``model_a`` (and ``model_b``) on the labelled images; their agreement and mean KL.

    images: a tensor (N, C, H, W), a folder, ``"imagenet"`` or ``"fmnist"``; labels: class indices
    (-1: unknown) for a tensor. Returns ``n``, ``n_labelled``, ``top1_a`` (None without labels) and,
    with ``model_b``: ``top1_b``, ``agreement`` (fraction of images with the same top-1 class) and
    ``kl`` (mean KL(softmax a || softmax b), nats).
    """
    if isinstance(images, torch.Tensor):
        x = images
        y = torch.full((len(x),), -1) if labels is None else torch.as_tensor(labels)
    else:
        x, y = load_images(images)
    if len(x) == 0:
        raise ModelFoldError("no images to evaluate")
    la = _logits(model_a, x, batch_size, progress, "model")
    lab = y >= 0
    n_lab = int(lab.sum())

    def top1(lg: torch.Tensor) -> float | None:
        return float((lg[lab].argmax(1) == y[lab]).float().mean()) if n_lab else None

    res: dict = {"n": len(x), "n_labelled": n_lab, "top1_a": top1(la)}
    if model_b is not None:
        lb = _logits(model_b, x, batch_size, progress, "reference")
        if lb.shape != la.shape:
            raise ModelFoldError(f"the models predict different numbers of classes ({la.shape[1]} vs "
                                 f"{lb.shape[1]})")
        pa, pb = la.log_softmax(1), lb.log_softmax(1)
        res.update(top1_b=top1(lb), agreement=float((la.argmax(1) == lb.argmax(1)).float().mean()),
                   kl=float((pa.exp() * (pa - pb)).sum(1).mean()))
    return res
