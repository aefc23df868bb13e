"""FID against network evaluations (NFE) for each difflab sampler on a trained Fashion-MNIST model.

Every sampler draws the same ``--n`` seeds from the same checkpoint at each NFE budget; FID, KID and
precision/recall come from ``difflab.pipelines.evaluate.score_images`` (shipped classifier's features,
Fashion-MNIST test set). The sigma-space samplers use the ``--spacing`` grid (default logsnr); ancestral
uses evenly strided timesteps; langevin and pc take ``--langevin-steps`` Langevin steps per noise level
(so their NFE buys fewer levels, ``difflab.samplers.steps_for_nfe``). Finished rows are kept in the results
file, so the script can be stopped and rerun.

    python benchmarks/fmnist_samplers.py --model runs/fashion_mnist --n 500 --nfe 10,20,50
    python benchmarks/fmnist_samplers.py --model runs/ncsn_fashion_mnist --samplers langevin,pc,dpmpp-2m --name ncsn
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.data import to_uint8_images  # noqa: E402
from difflab.pipelines.ddpm import load_model, sample  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, score_images  # noqa: E402
from difflab.samplers import SAMPLERS, steps_for_nfe  # noqa: E402

SCORE_SAMPLERS = ("langevin", "pc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", default="ddpm", help="results file: fmnist_samplers_<name>")
    parser.add_argument("--samplers", type=lambda s: s.split(","),
                        default=["ancestral", "ddim", "euler", "heun", "dpmpp-2m", "euler-ancestral", "pc"])
    parser.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--spacing", default="logsnr")
    parser.add_argument("--langevin-steps", type=int, default=1)
    parser.add_argument("--step-size", type=float, default=None, help="langevin's epsilon")
    parser.add_argument("--sigma-min", type=float, default=None,
                        help="stop the karras/logsnr grid here before the final denoising step")
    args = parser.parse_args()

    loaded = load_model(args.model)
    path = RESULTS_DIR / f"fmnist_samplers_{args.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    for name in args.samplers:
        if name not in SAMPLERS:
            parser.error(f"unknown sampler {name!r}")
        for nfe in args.nfe:
            label = name if args.sigma_min is None else f"{name} (sigma_min {args.sigma_min:g})"
            key = f"{label}/{nfe}"
            if key in data["rows"]:
                continue
            extra = {"langevin_steps": args.langevin_steps} if name in SCORE_SAMPLERS else {}
            if name == "langevin" and args.step_size is not None:
                extra["step_size"] = args.step_size
            options = dataclasses.replace(loaded.config.sample, sampler=name, spacing=args.spacing,
                                          sigma_min=args.sigma_min,
                                          steps=steps_for_nfe(name, nfe, args.langevin_steps), batch_size=250,
                                          **extra)
            start = time.perf_counter()
            images = to_uint8_images(sample(loaded, args.n, options, progress=True))
            seconds = time.perf_counter() - start
            metrics = score_images(images, None, EvalOptions(n=args.n, progress=False))["metrics"]
            data["rows"][key] = {"sampler": label, "nfe": nfe, "steps": options.steps, **extra,
                                 **{k: metrics[k] for k in ("fid", "kid", "precision", "recall")},
                                 "sampling_seconds": seconds}
            print(key, json.dumps(data["rows"][key]), file=sys.stderr)
            data.update(model=str(loaded.path), step=loaded.step, n=args.n, spacing=args.spacing,
                        command=command_line(), machine=machine_info())
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():                  # keep rows another run of this script wrote meanwhile
                data["rows"] = {**json.loads(path.read_text())["rows"], **data["rows"]}
            path.write_text(json.dumps(data, indent=1))
    nfes = sorted({r["nfe"] for r in data["rows"].values()})
    samplers = list(dict.fromkeys(r["sampler"] for r in data["rows"].values()))
    rows = [[s, *(f"{data['rows'][f'{s}/{n}']['fid']:.2f}" if f"{s}/{n}" in data["rows"] else "–" for n in nfes)]
            for s in samplers]
    markdown = (f"# FID vs NFE on Fashion-MNIST ({args.name})\n\n`{data['command']}` ({data['model']}, step "
                f"{data['step']}; {data['n']} samples per cell, {data['spacing']} spacing for the sigma-space "
                f"samplers; FID of {data['n']} samples is biased upwards, compare within the table)\n\n"
                + markdown_table(["sampler", *(f"NFE {n}" for n in nfes)], rows) + "\n")
    write_results(f"fmnist_samplers_{args.name}", data, markdown)


if __name__ == "__main__":
    main()
