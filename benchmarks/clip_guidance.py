"""CLIP guidance against classifier-free guidance on the same captioned model (issue #24; GLIDE, Nichol et al.
2022, Sec. 3 and 5.1: they preferred classifier-free guidance and found CLIP guidance exploits the CLIP with
adversarial examples, scoring well by the guiding CLIP and worse by humans).

The captioned model is the GLIDE-style Fashion-MNIST run of ``benchmarks/fmnist_text.py`` (runs/fmnist_text/glide,
trained with 20% empty captions, so it is both a conditional and an unconditional model). Two noise-aware CLIPs
(configs/fmnist_clip.yaml, the same minutes, seeds 0 and 1): seed 0 guides, seed 1 only scores. Each row: one
sample per test image (the first ``--n``), prompted with that image's caption, either with classifier-free
guidance at weight w or with CLIP guidance at scale s (on the conditional model, w = 0, and on the unconditional
model, the empty caption, as GLIDE's CLIP-guided models had no caption input). Scores, none of them by the guide:
FID against the test set and the shipped classifier's accuracy on the caption's class; the caption's class by
the evaluation CLIP (zero-shot, at t = 0) and, for the other way round, by the guiding CLIP.

    python benchmarks/clip_guidance.py clip --seed 0          # and --seed 1, two at a time
    python benchmarks/clip_guidance.py sample cfg --scale 2 [--n 2000]
    python benchmarks/clip_guidance.py sample clip --scale 4 [--unconditional]
    python benchmarks/clip_guidance.py report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "clip_guidance"
TEXT_RUN = REPO / "runs" / "fmnist_text" / "glide"


def clip_dir(seed: int) -> Path:
    return RUNS / f"clip_seed{seed}"


def run_clip(args: argparse.Namespace) -> None:
    settings = [f"train.out_dir={clip_dir(args.seed)}", f"train.seed={args.seed}", f"train.max_minutes={args.minutes}"]
    subprocess.run([sys.executable, "-m", "difflab", "train-clip", "configs/fmnist_clip.yaml", "--quiet",
                    *[item for s in settings for item in ("--set", s)]], check=True, cwd=REPO)


def zero_shot_classes(clip, images: torch.Tensor, class_names: list[str], batch: int = 500) -> torch.Tensor:
    """Each image's class by a CLIP at t = 0: the class whose captions' mean embedding scores highest."""
    from difflab.data.captions import load_captioned_fashion_mnist

    train = load_captioned_fashion_mnist("train", image_size=28)
    with torch.no_grad():
        prototypes = []
        for label in range(len(class_names)):
            captions = sorted({c for c, y in zip(train.captions, train.labels.tolist()) if y == label})
            embedded = clip.encode_text(clip.tokenize(captions)).mean(0)
            prototypes.append(embedded / embedded.norm())
        prototypes = torch.stack(prototypes)                                  # (classes, d)
        x = images.float() / 127.5 - 1
        t = torch.zeros(batch, dtype=torch.long)
        return torch.cat([(clip.encode_image(x[i:i + batch], t[: len(x[i:i + batch])]) @ prototypes.T).argmax(1)
                          for i in range(0, len(x), batch)])


def run_sample(args: argparse.Namespace) -> None:
    from difflab.clip_guidance import with_clip_tokens
    from difflab.data import to_uint8_images
    from difflab.data.captions import caption_agreement, load_captioned_fashion_mnist
    from difflab.pipelines.ddpm import load_model, sample
    from difflab.pipelines.evaluate import EvalOptions, score_images
    from difflab.pipelines.text import prompt_condition
    from difflab.train.clip import load_noisy_clip

    torch.set_num_threads(1)
    loaded = load_model(TEXT_RUN)
    test = load_captioned_fashion_mnist("test", image_size=28)
    captions, labels = list(test.captions[: args.n]), test.labels[: args.n]
    guide = load_noisy_clip(clip_dir(0))[0]
    cond = prompt_condition(loaded.denoiser, [""] * args.n if args.unconditional else captions)
    if args.mode == "cfg":
        options = dataclasses.replace(loaded.config.sample, guidance=args.scale, dynamic_threshold=None)
    else:
        cond = with_clip_tokens(cond, guide, captions)
        options = dataclasses.replace(loaded.config.sample, guidance=0.0, clip=str(clip_dir(0)),
                                      clip_scale=args.scale, dynamic_threshold=None)
    options = dataclasses.replace(options, seed=10 ** 6)
    start = time.perf_counter()
    images = to_uint8_images(sample(loaded, args.n, options, cond, progress=True))
    seconds = time.perf_counter() - start
    scored = score_images(images, labels, EvalOptions(n=args.n, progress=False), resize="pad")
    names = test.class_names
    record = {"mode": args.mode, "scale": args.scale, "unconditional": args.unconditional, "n": args.n,
              "model_step": loaded.step, "sampler": options.sampler, "steps": options.steps,
              "sample_seconds": seconds, "fid": scored["metrics"]["fid"],
              "class_accuracy": scored["metrics"]["class_accuracy"], "recall": scored["metrics"]["recall"],
              "precision": scored["metrics"]["precision"],
              "eval_clip_accuracy": (zero_shot_classes(load_noisy_clip(clip_dir(1))[0], images, names)
                                     == labels).float().mean().item(),
              "guide_clip_accuracy": (zero_shot_classes(guide, images, names) == labels).float().mean().item(),
              "attribute_agreement": caption_agreement(images, captions)}
    name = f"{args.mode}_{'uncond_' if args.unconditional else ''}s{args.scale:g}_n{args.n}.json"
    (RUNS / name).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


def run_report(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*_n*.json"))]
    records.sort(key=lambda r: (r["mode"], r["unconditional"], r["scale"]))
    from difflab.train.clip import read_noisy_clip

    clips = {seed: {"step": (state := read_noisy_clip(clip_dir(seed)).state).get("step"),
                    "test_retrieval": state.get("test_retrieval")} for seed in (0, 1)}
    rows = [[("classifier-free w" if r["mode"] == "cfg" else "CLIP s")
             + (" (empty caption)" if r["unconditional"] else ""), f"{r['scale']:g}", f"{r['fid']:.2f}", f"{r['class_accuracy']:.3f}", f"{r['eval_clip_accuracy']:.3f}",
             f"{r['guide_clip_accuracy']:.3f}", f"{r['recall']:.3f}", str(r["n"])] for r in records]
    table = markdown_table(["guidance", "scale", "FID", "classifier: caption class", "eval CLIP: caption class",
                            "guiding CLIP: caption class", "recall", "samples"], rows)
    write_results("clip_guidance", {"results": records, "clips": clips, "machine": machine_info(),
                                    "command": command_line()},
                  "# CLIP guidance vs classifier-free guidance\n\n" + (__doc__ or "") + "\n" + table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    clip = sub.add_parser("clip")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--minutes", type=float, default=8.0)
    clip.set_defaults(func=run_clip)
    draw = sub.add_parser("sample")
    draw.add_argument("mode", choices=("cfg", "clip"))
    draw.add_argument("--scale", type=float, required=True)
    draw.add_argument("--n", type=int, default=2000)
    draw.add_argument("--unconditional", action="store_true", help="prompt the model with the empty caption")
    draw.set_defaults(func=run_sample)
    sub.add_parser("report").set_defaults(func=run_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
