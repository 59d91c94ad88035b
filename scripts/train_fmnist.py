#!/usr/bin/env python
"""Deterministic, resumable training of the Fashion-MNIST reference models of ``modelfold.zoo``.

    python scripts/train_fmnist.py --model resnet18|vgg11_bn --epochs N --out-dir cache/train

SGD (momentum 0.9, Nesterov, weight decay 5e-4), OneCycle LR sized to ``--epochs``, batch 128,
random-crop (32, padding 4) + horizontal-flip augmentation done on tensors. A full resume state
(model, optimizer, scheduler, RNG states, epoch/step) is written to ``<out-dir>/<model>/resume.pt``
after every epoch (and every ``--save-every`` steps); rerunning the same command resumes from it.
After every epoch the test accuracy is appended to ``<out-dir>/<model>/log.tsv``. At the end the
fp16 weights go to ``modelfold/checkpoints/<model>_fmnist.safetensors`` and the log next to them.
``--init-from W.safetensors`` continues from trained weights with a fresh (shorter) schedule; the
log then starts with the history of ``W`` (from ``W.log``) as comment lines.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from modelfold.datasets import fashion_mnist  # noqa: E402
from modelfold.zoo import CHECKPOINT_DIR, resnet18_cifar, vgg11_bn_cifar  # noqa: E402

MODELS = {"resnet18": resnet18_cifar, "vgg11_bn": vgg11_bn_cifar}
LOG_HEADER = "epoch\ttrain_loss\ttest_acc\tseconds\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--epochs", type=int, required=True, help="length of the LR schedule")
    p.add_argument("--out-dir", type=Path, default=REPO / "cache" / "train")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the OneCycle schedule")
    p.add_argument("--pct-start", type=float, default=0.25, help="OneCycle warm-up fraction")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--crop-pad", type=int, default=4, help="random-crop padding (0 disables cropping)")
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=100, help="also save the resume state every N steps")
    p.add_argument("--restart", action="store_true", help="ignore an existing resume state")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from these weights (a .safetensors of the same model) with a fresh schedule; "
                   "their training log, if next to them, heads the new log")
    p.add_argument("--no-export", action="store_true", help="do not write modelfold/checkpoints/ at the end")
    return p.parse_args(argv)


def augment(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``pad``, same size) and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))  # zero in normalized space; fine for a cheap augmentation
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
        xp = torch.gather(xp, 2, rows)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
        x = torch.gather(xp, 3, cols)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (switched to eval mode) on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].contiguous(memory_format=torch.channels_last)
        correct += (model(xb).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(model: nn.Module, log_path: Path, name: str) -> Path:
    """Write fp16 safetensors weights and the training log to ``modelfold/checkpoints/``."""
    from safetensors.torch import save_file

    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    dst = CHECKPOINT_DIR / f"{name}.safetensors"
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "dtype": "float16"})
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
    os.replace(tmp, dst)
    log_dst = CHECKPOINT_DIR / f"{name}.log"
    tmp_log = log_dst.with_name(log_dst.name + ".tmp")
    shutil.copyfile(log_path, tmp_log)
    os.replace(tmp_log, log_dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    run_dir = args.out_dir / args.model
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_path = run_dir / "resume.pt"
    log_path = run_dir / "log.tsv"
    config = {
        k: v
        for k, v in vars(args).items()
        if k in ("model", "epochs", "batch_size", "lr", "pct_start", "weight_decay", "crop_pad", "no_flip", "seed")
    }
    if args.init_from is not None:
        src = args.init_from.resolve()
        config["init_from"] = str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src)

    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    n = len(x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)

    model = MODELS[args.model]()
    init_note = ""
    if args.init_from is not None:
        import hashlib

        from safetensors.torch import load_file

        if not args.init_from.is_file():
            raise SystemExit(f"--init-from {args.init_from}: no such file")
        digest = hashlib.sha256(args.init_from.read_bytes()).hexdigest()[:12]
        model.load_state_dict({k: v.float() for k, v in load_file(str(args.init_from)).items()})
        prior = args.init_from.with_suffix(".log")
        init_note = f"# initialized from {args.init_from.name} (sha256:{digest})"
        if prior.is_file():
            init_note += ", whose log follows\n" + "".join(
                f"# {line}" for line in prior.read_text().splitlines(keepends=True)
            )
        init_note = init_note.rstrip("\n") + "\n" + f"# then {args.epochs} epochs: {config}\n"
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=args.pct_start
    )
    aug_gen = torch.Generator().manual_seed(args.seed + 1)
    start_epoch, start_step, loss_sum, epoch_seconds = 0, 0, 0.0, 0.0

    if resume_path.exists() and not args.restart:
        state = torch.load(resume_path, weights_only=False)
        if state["config"] != config:
            raise SystemExit(
                f"{resume_path} was written with {state['config']}, not {config}; "
                "rerun with the same options or pass --restart"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, start_step = state["epoch"], state["step"]
        loss_sum, epoch_seconds = state["loss_sum"], state["epoch_seconds"]
        print(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}", flush=True)
    elif args.restart or not log_path.exists():
        log_path.write_text(init_note + LOG_HEADER)
    if not log_path.exists():
        log_path.write_text(init_note + LOG_HEADER)

    def save(epoch: int, step: int) -> None:
        atomic_save(
            {
                "config": config,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "aug_rng": aug_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "step": step,
                "loss_sum": loss_sum,
                "epoch_seconds": epoch_seconds,
            },
            resume_path,
        )

    for epoch in range(start_epoch, args.epochs):
        # The shuffling order depends only on (seed, epoch), so a mid-epoch resume replays it exactly.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        model.train()
        t0 = time.time()
        bar = tqdm(
            range(start_step, steps_per_epoch),
            initial=start_step,
            total=steps_per_epoch,
            desc=f"{args.model} epoch {epoch + 1}/{args.epochs}",
            mininterval=20,
            file=sys.stdout,
        )
        for step in bar:
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = augment(x_train[idx], args.crop_pad, not args.no_flip, aug_gen)
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}", refresh=False)
            done = step + 1
            if args.save_every and done % args.save_every == 0 and done < steps_per_epoch:
                epoch_seconds += time.time() - t0
                t0 = time.time()
                save(epoch, done)
        bar.close()
        acc = evaluate(model, x_test, y_test)
        epoch_seconds += time.time() - t0
        line = f"{epoch + 1}\t{loss_sum / n:.4f}\t{acc:.4f}\t{epoch_seconds:.0f}"
        with log_path.open("a") as fh:
            fh.write(line + "\n")
        print(f"epoch {epoch + 1}: train_loss {loss_sum / n:.4f} test_acc {acc:.4f} {epoch_seconds:.0f}s", flush=True)
        start_step, loss_sum, epoch_seconds = 0, 0.0, 0.0
        save(epoch + 1, 0)

    if not args.no_export:
        dst = export(model, log_path, f"{args.model}_fmnist")
        print(f"wrote {dst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
