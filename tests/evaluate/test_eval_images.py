"""Top-1, agreement and KL of image models; image folders and the shipped images."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modelfold.errors import CheckpointError, ModelFoldError
from modelfold.evaluate.images import image_agreement, image_folder, imagenet_images


def tiny_cnn(seed: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, classes)).eval()


def test_agreement_top1_and_kl_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, -1, -1, 2, 3])
    a, b = tiny_cnn(0), tiny_cnn(1)
    with torch.no_grad():
        la, lb = a(x), b(x)
    r = image_agreement(a, b, x, y, batch_size=3)
    lab = y >= 0
    assert r["n"] == 10 and r["n_labelled"] == 8
    assert r["top1_a"] == pytest.approx(float((la[lab].argmax(1) == y[lab]).float().mean()))
    assert r["top1_b"] == pytest.approx(float((lb[lab].argmax(1) == y[lab]).float().mean()))
    assert r["agreement"] == pytest.approx(float((la.argmax(1) == lb.argmax(1)).float().mean()))
    kl = torch.nn.functional.kl_div(lb.log_softmax(1), la.log_softmax(1), log_target=True, reduction="batchmean")
    assert r["kl"] == pytest.approx(float(kl), rel=1e-5) and r["kl"] > 0
    same = image_agreement(a, a, x, y)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-7)
    assert image_agreement(a, images=x)["top1_a"] is None and "agreement" not in image_agreement(a, images=x)


def test_image_folder_labels_and_errors(tmp_path) -> None:
    from PIL import Image

    (tmp_path / "7").mkdir()
    rng = torch.Generator().manual_seed(0)
    for name in ("cat_3.png", "7/photo.jpg", "unlabelled.png"):
        arr = torch.randint(0, 256, (40, 60, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    x, y = image_folder(tmp_path, size=32)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [7, 3, -1]  # sorted paths: 7/photo, cat_3, unlabelled
    x5, _ = image_folder(tmp_path, size=32, crops=True)
    assert x5.shape[0] == 15 and torch.equal(x5[0], x[0])  # the center crop first
    with pytest.raises(CheckpointError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CheckpointError, match="cannot read image"):
        image_folder(tmp_path)
    with pytest.raises(ModelFoldError, match="does not accept these images"):
        image_agreement(nn.Linear(5, 2), images=x)


def test_shipped_imagenet_images() -> None:
    x, y = imagenet_images()
    assert x.shape[1:] == (3, 224, 224) and int((y >= 0).sum()) == 20 and len(x) >= 20 + 5 * 20
    assert bool(torch.isfinite(x).all()) and abs(float(x.mean())) < 1.0
