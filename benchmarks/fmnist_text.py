"""Text-to-image on Fashion-MNIST's templated captions (issue #18): GLIDE-style (a byte-level text transformer
trained with the U-Net) against Imagen-style (the frozen MiniLM sentence encoder), beside the class-conditional
preset, all three the same U-Net trained for the same minutes of one thread (bf16 autocast where native).

Scoring, for each guidance weight w: one sample per test-set image, prompted with that image's caption (the
test split's captions: the training grammar, images never trained on), or with ``--held-out`` the held-out
paraphrases (names and templates never seen in training, "running shoe" for sneaker); the class-conditional
model gets the image's label instead. FID against the test set with the shipped classifier's features, that
classifier's accuracy on the caption's class, and the attribute check of ``difflab.data.captions``
(``caption_agreement``: the share of captions whose stated brightness / fill / pattern the sample's measured
attribute matches; the test images themselves against shuffled captions give the chance level). Every model
is sampled alike: the presets' Heun sampler, static clipping of x0 unless ``--threshold dynamic`` (Imagen's,
p = 0.995) is asked for.

    python benchmarks/fmnist_text.py train glide              # and minilm, classcond: two at a time
    python benchmarks/fmnist_text.py sample glide --guidance 2 [--held-out] [--n 10000] [--threshold dynamic]
    python benchmarks/fmnist_text.py report
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
from fmnist_budget import cpu_has_fast_bf16  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "fmnist_text"
PRESETS = {"glide": ("configs/fmnist_text_glide.yaml", []),
           "minilm": ("configs/fmnist_text_minilm.yaml", []),
           "classcond": ("configs/fashion_mnist.yaml", ["data.conditional=true", "train.label_dropout=0.2"])}


def run_train(args: argparse.Namespace) -> None:
    preset, overrides = PRESETS[args.model]
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    settings = [f"train.out_dir={RUNS / args.model}", f"train.max_minutes={args.minutes}",
                f"train.precision={precision}", *overrides]
    subprocess.run([sys.executable, "-m", "difflab", "train", preset, "--quiet",
                    *[item for s in settings for item in ("--set", s)]], check=True, cwd=REPO)


def test_prompts(n: int, held_out: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The first n test images' captions (held-out paraphrases if asked), labels and images."""
    from difflab.data.captions import load_captioned_fashion_mnist

    test = load_captioned_fashion_mnist("test", image_size=28, held_out=held_out)
    return list(test.captions[:n]), test.labels[:n], test.images[:n]


def run_sample(args: argparse.Namespace) -> None:
    from difflab.data import to_uint8_images
    from difflab.data.captions import caption_agreement
    from difflab.pipelines.ddpm import class_condition, load_model, sample
    from difflab.pipelines.evaluate import EvalOptions, score_images
    from difflab.pipelines.text import prompt_condition

    torch.set_num_threads(1)
    loaded = load_model(RUNS / args.model)
    captions, labels, _ = test_prompts(args.n, args.held_out)
    cond = (class_condition(labels) if args.model == "classcond"
            else prompt_condition(loaded.denoiser, captions))
    threshold = {"static": {"clip_x0": True, "dynamic_threshold": None},
                 "dynamic": {"clip_x0": False, "dynamic_threshold": 0.995}}[args.threshold]
    options = dataclasses.replace(loaded.config.sample, guidance=args.guidance, seed=10 ** 6, **threshold)
    start = time.perf_counter()
    images = to_uint8_images(sample(loaded, args.n, options, cond, progress=True))
    seconds = time.perf_counter() - start
    scored = score_images(images, labels, EvalOptions(n=args.n, progress=False), resize="pad")
    record = {"model": args.model, "guidance": args.guidance, "held_out": args.held_out, "n": args.n,
              "step": loaded.step, "sampler": options.sampler, "steps": options.steps,
              "dynamic_threshold": options.dynamic_threshold, "sample_seconds": seconds,
              "fid": scored["metrics"]["fid"], "class_accuracy": scored["metrics"]["class_accuracy"],
              "precision": scored["metrics"]["precision"], "recall": scored["metrics"]["recall"],
              "attribute_agreement": caption_agreement(images, captions) if args.model != "classcond" else None}
    out = RUNS / args.model / (f"eval_w{args.guidance:g}_n{args.n}{'_heldout' if args.held_out else ''}"
                               f"{'_dynamic' if args.threshold == 'dynamic' else ''}.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


def chance_agreement(n: int = 10000) -> dict:
    """The attribute check of the test images against their own captions, and against shuffled ones."""
    from difflab.data.captions import caption_agreement

    captions, _, images = test_prompts(n, held_out=False)
    shuffled = [captions[i] for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))]
    return {"own": caption_agreement(images, captions), "shuffled": caption_agreement(images, shuffled)}


def run_report(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/eval_w*.json"))]
    records.sort(key=lambda r: (r["held_out"], r["guidance"], r["model"]))
    rows = []
    for r in records:
        agreement = r["attribute_agreement"] or {}
        rows.append([r["model"], "held-out" if r["held_out"] else "test", f"{r['guidance']:g}",
                     "dynamic" if r["dynamic_threshold"] else "static", str(r["step"]),
                     f"{r['fid']:.2f}", f"{r['class_accuracy']:.3f}",
                     " / ".join(f"{agreement[k]:.2f}" for k in ("brightness", "fill", "pattern")) if agreement else "",
                     str(r["n"])])
    chance = chance_agreement()
    table = markdown_table(["model", "captions", "guidance w", "threshold", "steps trained", "FID",
                            "caption-class accuracy",
                            "attribute agreement (brightness / fill / pattern)", "samples"], rows)
    levels = {k: " / ".join(f"{v[a]:.2f}" for a in ("brightness", "fill", "pattern")) for k, v in chance.items()}
    notes = (f"\nAttribute agreement of the test images with their own captions: {levels['own']}; with shuffled "
             f"captions (chance): {levels['shuffled']}.\n")
    write_results("fmnist_text", {"results": records, "chance_agreement": chance, "machine": machine_info(),
                                  "command": command_line()},
                  "# Text-to-image on Fashion-MNIST captions\n\n" + (__doc__ or "") + "\n" + table + "\n" + notes)
    print(table + "\n" + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    train = sub.add_parser("train")
    train.add_argument("model", choices=sorted(PRESETS))
    train.add_argument("--minutes", type=float, default=20.0)
    train.set_defaults(func=run_train)
    draw = sub.add_parser("sample")
    draw.add_argument("model", choices=sorted(PRESETS))
    draw.add_argument("--guidance", type=float, default=0.0)
    draw.add_argument("--n", type=int, default=10000)
    draw.add_argument("--held-out", action="store_true")
    draw.add_argument("--threshold", choices=("static", "dynamic"), default="static",
                      help="x0 thresholding, the same for every model (dynamic: Imagen's, p = 0.995)")
    draw.set_defaults(func=run_sample)
    sub.add_parser("report").set_defaults(func=run_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
