"""Train the Fashion-MNIST classifier that difflab ships for its metrics (difflab.metrics.features).

A small CNN (difflab.nets.classifier) trained on the 60k training images with random shifts (1-pixel
zero padding, then a random 28x28 crop) and horizontal flips, AdamW and a one-cycle learning rate
(Smith & Topin 2019). Runs on the CPU in a few minutes; writes a safetensors file whose metadata holds the
config, the test accuracy and how it was trained:

    OMP_NUM_THREADS=1 python scripts/train_fmnist_classifier.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data import load_fashion_mnist
from difflab.metrics.features import fmnist_classifier_path, load_classifier, save_classifier
from difflab.nets.classifier import Classifier, ClassifierConfig

def augment(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero fill) and random horizontal flip, per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]                     # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]                     # (n, 1, w)
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]   # (n, 1, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy(net: Classifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = sum((net(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, len(images), batch))
    return correct / len(images)


def train(args: argparse.Namespace) -> tuple[Classifier, float]:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_set, test_set = load_fashion_mnist("train", image_size=28), load_fashion_mnist("test", image_size=28)
    x_train = train_set.data.float() / 127.5 - 1
    x_test = test_set.data.float() / 127.5 - 1
    net = Classifier(ClassifierConfig(channels=tuple(args.channels), convs_per_stage=args.convs_per_stage,
                                      feature_dim=args.feature_dim)).to(memory_format=torch.channels_last)
    steps_per_epoch = len(x_train) // args.batch_size
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(x_train[index], args.shift, generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), train_set.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        test_acc = accuracy(net, x_test, test_set.labels)
        print(f"epoch {epoch + 1}/{args.epochs}: last loss {loss.item():.4f}, test accuracy {test_acc:.4f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return net.eval(), test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--shift", type=int, default=1, help="pixels of random translation")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-2)
    parser.add_argument("--channels", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--convs-per-stage", type=int, default=2)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=fmnist_classifier_path())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, test_acc = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"test_accuracy": round(test_acc, 4), "dataset": "fashion_mnist", "image_size": 28,
                "epochs": args.epochs, "shift": args.shift, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed,
                "trained_with": f"scripts/train_fmnist_classifier.py, torch {torch.__version__}"}
    save_classifier(net.to(memory_format=torch.contiguous_format), args.out, metadata)
    reloaded = load_classifier(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), test accuracy {test_acc:.4f}, "
          f"reloaded as {reloaded.name}")


if __name__ == "__main__":
    main()
