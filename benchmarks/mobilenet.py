#!/usr/bin/env python
"""MobileNetV2 (official ImageNet weights), every group eligible: agreement with the original.

    python benchmarks/mobilenet.py                        # 10/20/30% of parameters removed
    python benchmarks/mobilenet.py --sparsities 0.2 --methods fold sp-act+ls

Evaluation: every real photo the offline packages ship that is not used for calibration — foolbox's
20 ImageNet samples and scikit-image's colour photos (astronaut, chelsea, coffee, rocket,
motorcycle_left, hubble_deep_field, ihc, retina), 5 crops each (4 corners + centre of the
256-resized image, 224 x 224): top-1 agreement with the original model's prediction and mean
KL(original || compressed) of the softmax outputs. Calibration "data" uses other photos only:
scikit-image's grey-scale photos (as RGB) and motorcycle_right, random crops; "self" is the
DeepInversion batch the model makes itself, cached: compress()'s default self batch
(``traced.sources.SELF_DEFAULTS``, chosen in benchmarks/cnn_self_batch.py), or ``--self BxTxR``
(images x steps x pixels; the rows before that default used 32 x 60 x 64). No ignore=: every group
is eligible.
Records: ``benchmarks/results/mobilenet.json`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import modelfold  # noqa: E402
from modelfold.assets import IMAGENET_MEAN, IMAGENET_STD, mobilenet_v2_imagenet, package_dir  # noqa: E402
from modelfold.traced.budget import plan_for_sparsity  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
EVAL_SKIMAGE = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                "hubble_deep_field.jpg", "ihc.png", "retina.jpg")
CALIB_SKIMAGE = ("brick.png", "camera.png", "cell.png", "clock_motion.png", "coins.png", "grass.png", "gravel.png",
                 "moon.png", "page.png", "text.png", "motorcycle_right.png")
SELF: dict = {}  # compress()'s default self batch; --self BxTxR overrides
METHODS = ("sp-l2", "fold", "fold-ar", "neuron-merging", "sp-act+ls", "fold-act+ls", "sp-act+ls+auto",
           "fold-act+ls+auto", "sp-act+ls:data", "sp-act+ls+auto:data")


def _tensor(img) -> torch.Tensor:  # PIL RGB -> normalized (3, H, W)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x.permute(2, 0, 1).float() / 255 - mean) / std


def _resized(path: Path, short: int = 256):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BILINEAR)


def five_crops(path: Path, size: int = 224) -> list[torch.Tensor]:
    img = _resized(path)
    w, h = img.size
    boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), ((w - size) // 2, (h - size) // 2)]
    return [_tensor(img.crop((x, y, x + size, y + size))) for x, y in boxes]


def eval_images() -> tuple[torch.Tensor, list[str]]:
    files = sorted((package_dir("foolbox", "foolbox==3.3.4") / "data").glob("imagenet_*.jpg"))
    sk = package_dir("skimage", "scikit-image==0.26.0") / "data"
    files += [sk / f for f in EVAL_SKIMAGE]
    return torch.stack([c for f in files for c in five_crops(f)]), [f.name for f in files]


def calib_images(n_per: int = 8, size: int = 112, seed: int = 0) -> torch.Tensor:
    """Random crops (scale 0.3-1 of the short side) of photos never used for evaluation, resized."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    sk = package_dir("skimage", "scikit-image==0.26.0") / "data"
    out = []
    for name in CALIB_SKIMAGE:
        img = Image.open(sk / name).convert("RGB")
        w, h = img.size
        for _ in range(n_per):
            c = int(min(w, h) * (0.3 + 0.7 * float(torch.rand((), generator=g))))
            x0 = int(torch.randint(0, w - c + 1, (), generator=g))
            y0 = int(torch.randint(0, h - c + 1, (), generator=g))
            out.append(_tensor(img.crop((x0, y0, x0 + c, y0 + c)).resize((size, size), Image.BILINEAR)))
    return torch.stack(out)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)])


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict:
    lp, lq = ref.log_softmax(1), out.log_softmax(1)
    kl = (lp.exp() * (lp - lq)).sum(1)
    return {"agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()), "kl": float(kl.mean())}


def run(method: str, model: nn.Module, sparsity: float, ratio: float, calib: torch.Tensor) -> tuple:
    ex = torch.zeros(1, 3, 224, 224)
    base, _, source = method.partition(":")
    cal = calib if source == "data" else "self"
    opts = {} if source == "data" else dict(SELF)
    auto = base.endswith("+auto")
    amount = {"sparsity": sparsity} if auto else {"ratio": ratio}
    if not auto and "+ls" in base:
        opts["budget"] = "uniform"
    if "+ls" not in base and base.startswith(("sp-act", "fold-act")):
        opts["compensate"] = False  # calibrated plan (and budget), no least-squares refit
    if base == "sp-l2":
        return modelfold.prune(model, ex, ratio, return_report=True)
    if base == "fold":
        return modelfold.fold(model, ex, ratio, return_report=True)
    if base == "fold-ar":
        return modelfold.fold(model, ex, ratio, repair="ar", return_report=True)
    if base == "neuron-merging":
        return modelfold.prune(model, ex, ratio, merge="neuron", return_report=True)
    if base.startswith("sp-act"):
        return modelfold.prune(model, ex, calibration=cal, calibration_kwargs=opts, return_report=True, **amount)
    if base.startswith("fold-act"):
        return modelfold.fold(model, ex, calibration=cal, calibration_kwargs=opts, return_report=True, **amount)
    raise SystemExit(f"unknown method {method}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS / "mobilenet.json")
    ap.add_argument("--self", dest="self_batch", help="self batch BxTxR (images x steps x pixels); default: compress()'s")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--rerun", action="store_true", help="measure the rows again (earlier records get 'superseded')")
    args = ap.parse_args()
    if args.self_batch:
        b, t, r = (int(v) for v in args.self_batch.split("x"))
        SELF.update(self_batch=b, self_iters=t, self_shape=(3, r, r))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mobilenet_v2_imagenet()
    x, files = eval_images()
    calib = calib_images()
    ref = logits(model, x)
    records = json.loads(args.out.read_text()) if args.out.is_file() else []
    key = lambda r: (r.get("method_key", r["method"]), r["target_sparsity"])  # noqa: E731
    done = {key(r) for r in records if not r.get("superseded")} if not args.rerun else set()
    print(f"{len(x)} evaluation crops of {len(files)} photos; {len(calib)} real calibration crops", flush=True)
    for s in args.sparsities:
        ratio = None
        for method in args.methods:
            if (method, s) in done:
                continue
            if ratio is None and not method.split(":")[0].endswith("+auto"):
                work = modelfold.api.checks.prepare(model, torch.zeros(1, 3, 224, 224))
                ratio = plan_for_sparsity(work, torch.zeros(1, 3, 224, 224), s, set(), set())[0]
            t0 = time.perf_counter()
            out, rep = run(method, model, s, ratio, calib)
            secs = time.perf_counter() - t0
            rec = {"model": "mobilenet_v2_imagenet", "method": method.split(":")[0],
                   "calibration": "data" if method.endswith(":data") else ("self" if "-act" in method else "none"),
                   "target_sparsity": s, "param_sparsity": rep.param_sparsity, "ratio": rep.ratio,
                   **compare(ref, logits(out, x)), "seconds": round(secs, 1), "eval_images": len(x),
                   "plan": rep.repair_info.get("plan"), "refit": rep.repair_info.get("refit"),
                   "self_settings": rep.repair_info.get("self_settings"), "self_shape": rep.repair_info.get("self_shape")}
            rec["method_key"] = method
            for r in records:  # an earlier measurement of the same row stays, marked
                if key(r) == (method, s) and not r.get("superseded"):
                    r["superseded"] = f"re-run with {rec['self_settings'] or 'no self batch'} (the later record)"
            records.append(rec)
            print(f"s={s:.2f} {method:<22} sparsity={rec['param_sparsity']:.3f} agree={rec['agreement']:.3f} "
                  f"kl={rec['kl']:.3f} ({secs:.0f}s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(records, indent=1))
            tmp.replace(args.out)


if __name__ == "__main__":
    main()
