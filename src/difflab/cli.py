"""The ``difflab`` command: parses arguments, loads a config or checkpoint, calls the library.

Bad input (a missing file, an unknown key, a corrupt checkpoint) is reported in one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from difflab.errors import DifflabError


def cmd_train(args: argparse.Namespace) -> int:
    """Train in this process, or as one rank of ``torchrun --nproc_per_node=N -m difflab train ...``."""
    import os

    from difflab.config import load_config
    from difflab.pipelines.ddpm import preview_callback
    from difflab.presets import resolve_config
    from difflab.train import distributed
    from difflab.train.controlnet import controlnet_trainer
    from difflab.train.diffusion import diffusion_trainer

    config = load_config(resolve_config(args.config), args.set)
    if config.distill.method == "progressive":
        return train_progressive(config, args)
    if config.model.kind == "autoencoder":
        return train_autoencoder(config, args)
    dist = distributed.init(config.train.device, os.environ)     # torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    say = print if dist.is_main else (lambda *a, **k: None)
    make_trainer = controlnet_trainer if config.model.kind == "controlnet" else diffusion_trainer
    try:
        trainer = make_trainer(config, resume=args.resume if args.resume else False, progress=not args.quiet,
                                    dist=dist, preview=lambda spec, latent: preview_callback(config, spec, dist.device, latent),
                                    overwrite=args.overwrite)
        if trainer.step:
            say(f"resuming {config.name} from step {trainer.step}", file=sys.stderr)
        try:
            result = trainer.run()
        except KeyboardInterrupt:
            written = "not written (interrupted mid-step; the last one is kept)" if trainer.mid_step else "written"
            say(f"\ninterrupted at step {trainer.step}; checkpoint {written} in "
                f"{trainer.out_dir / 'checkpoint.safetensors'} (continue with --resume)", file=sys.stderr)
            return 130
    finally:
        distributed.teardown(dist)
    ranks = f" on {dist.world_size} ranks" if dist.is_distributed else ""
    say(f"trained {config.name} to step {result.step}{ranks} (stopped by {result.stopped_by}, last loss "
        f"{result.last_loss:.4f}); checkpoint {result.checkpoint}; samples in {trainer.out_dir / 'samples'}")
    return 0


def train_autoencoder(config, args: argparse.Namespace) -> int:
    """The autoencoder of latent diffusion; when its training ends, its latent scale is measured and saved."""
    from difflab.train.autoencoder import autoencoder_trainer, finish_autoencoder

    trainer = autoencoder_trainer(config, resume=args.resume if args.resume else False, progress=not args.quiet,
                                  overwrite=args.overwrite)
    try:
        result = trainer.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {trainer.step}; checkpoint kept in {trainer.out_dir} (continue with --resume; "
              f"the latent scale is measured when training ends)", file=sys.stderr)
        return 130
    record = finish_autoencoder(trainer)
    error = record["test_reconstruction"]
    print(f"trained autoencoder {config.name} to step {result.step} (stopped by {result.stopped_by}); latent scale "
          f"{record['scale']:.5f} over {record['scale_examples']} training images; test reconstruction MSE "
          f"{error['mse']:.5f}, MAE {error['mae']:.4f} (pixels in [-1, 1]); checkpoint {result.checkpoint}")
    return 0


def train_progressive(config, args: argparse.Namespace) -> int:
    """Progressive distillation: its rounds, one run folder each (one process; no torchrun)."""
    from difflab.pipelines.ddpm import preview_callback
    from difflab.train.progressive import progressive_distillation

    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    try:
        results = progressive_distillation(config, resume=bool(args.resume), progress=not args.quiet,
                                           overwrite=args.overwrite, preview=preview_callback, say=say)
    except KeyboardInterrupt:
        say(f"\ninterrupted; every round's last checkpoint is kept under {config.train.out_dir} "
            f"(continue with --resume)")
        return 130
    last = results[-1].checkpoint if results else config.train.out_dir
    print(f"distilled {config.name}: {len(results)} round(s) trained; the last student is {last}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from difflab.conditioning import ClassLabel
    from difflab.pipelines.ddpm import class_condition, load_model, sample, save_samples

    if args.nrow is not None and args.nrow < 1 or args.scale < 1:
        raise DifflabError("--nrow and --scale must be at least 1")
    if (args.checkpoint is None) == (args.diffusers is None):
        raise DifflabError("sample: give either a checkpoint (run folder, cascade file) or --diffusers DIR")
    if args.diffusers is not None:
        from difflab.pipelines.diffusers_load import load_diffusers
        loaded = load_diffusers(args.diffusers, args.device)
    elif args.checkpoint.suffix in (".yaml", ".yml"):
        from difflab.pipelines.unclip import is_unclip_file
        return sample_unclip_file(args) if is_unclip_file(args.checkpoint) else sample_cascade_file(args)
    else:
        loaded = load_model(args.checkpoint, args.weights, args.device)
    options = dataclasses.replace(loaded.config.sample, **sampling_overrides(args))
    options = clip_options(args, options)
    labels = None
    if args.class_label is not None:
        label = loaded.spec.condition_fields().get("label")
        if label is None and options.classifier:                   # classifier guidance of an unconditional model
            from difflab.train.classifier import load_noisy_classifier
            label = ClassLabel("label", num_classes=load_noisy_classifier(options.classifier)[0].config.num_classes)
        if label is None:
            raise DifflabError(f"--class: {loaded.path} is not class-conditional (and no --classifier is given)")
        labels = torch.full((args.n,), label.class_id(args.class_label), dtype=torch.long)
    print(f"sampling {args.n} from {loaded.path} (step {loaded.step}) with {loaded.weights} weights, "
          f"{options.sampler} sampler, " + (f"grid {', '.join(f'{v:g}' for v in options.sigmas)}" if options.sigmas
                                            else f"{options.steps} steps"), file=sys.stderr)
    cond, hints = class_condition(labels), None
    if args.prompt:
        from difflab.pipelines.text import is_text_model, prompt_condition, repeat_prompts

        if labels is not None:
            raise DifflabError("--prompt and --class: a text-to-image model takes the caption alone")
        prompts = repeat_prompts(args.prompt, args.n)
        if not options.clip_scale or is_text_model(loaded.spec):    # CLIP guidance alone may steer any model
            cond = prompt_condition(loaded.denoiser, prompts)
        print("prompts: " + " | ".join(args.prompt), file=sys.stderr)
    if options.clip_scale:
        from difflab.clip_guidance import with_clip_tokens
        from difflab.train.clip import load_noisy_clip

        cond = with_clip_tokens(cond, load_noisy_clip(options.clip)[0], prompts)
    if args.control is not None or args.control_from is not None:
        cond, hints = control_condition(args, loaded, cond)
    if args.init_image is None:
        if args.mask is not None:
            raise DifflabError("--mask needs the image to inpaint (--init-image)")
        samples = sample(loaded, args.n, options, cond, args.device, progress=True)
    else:
        samples = edit_images(args, loaded, options, cond)
    for path in save_samples(samples, args.out, args.name, labels, columns=args.nrow, scale=args.scale,
                             each=args.each):
        print(path)
    if hints is not None:
        from difflab.pipelines.control import agreement, save_pairs

        print(save_pairs(hints, samples, args.out / f"{args.name}_pairs.png", args.scale))
        hint = loaded.spec.condition_fields()["control"].hint
        score = agreement(loaded.spec, hints, samples).mean().item()
        what = "1 - mean absolute difference of the sketches" if hint == "sketch" else f"F1 of the {hint} maps"
        print(f"agreement with the control images ({what}): {score:.3f}", file=sys.stderr)
    return 0


def clip_options(args: argparse.Namespace, options):
    """``--clip RUN_OR_FILE [--clip-scale S]`` (scale 1 when only --clip is given), checked before anything is
    loaded or sampled: CLIP guidance needs the captions to guide towards."""
    if args.clip is not None and args.clip_scale is None:
        options = dataclasses.replace(options, clip_scale=1.0)
    if args.clip_scale is not None and args.clip is None and not options.clip:
        raise DifflabError("--clip-scale: CLIP guidance needs a noise-aware CLIP (--clip RUN_OR_FILE)")
    if options.clip_scale and not args.prompt:
        raise DifflabError("--clip: CLIP guidance needs a caption to guide towards (--prompt TEXT)")
    if options.clip_scale:
        from difflab.train.clip import read_noisy_clip
        read_noisy_clip(options.clip)                        # a missing or foreign file fails here, in one line
        print(f"CLIP guidance with {options.clip} at scale {options.clip_scale:g}", file=sys.stderr)
    return options


def sample_cascade_file(args: argparse.Namespace) -> int:
    """``difflab sample CASCADE.yaml``: base, then every super-resolution stage (``difflab.pipelines.cascade``)."""
    import torch

    from difflab.pipelines.cascade import load_cascade, load_stages, sample_cascade
    from difflab.pipelines.ddpm import class_condition, save_samples

    config = load_cascade(args.checkpoint)
    if args.aug_level is not None:
        config.aug_level = args.aug_level
    if args.truncated:
        config.truncated = True
    stages = load_stages(config, args.weights, args.device)
    labels = None
    if args.class_label is not None:
        label = stages[0].spec.condition_fields().get("label")
        if label is None:
            raise DifflabError(f"--class: the cascade's base {stages[0].path} is not class-conditional")
        labels = torch.full((args.n,), label.class_id(args.class_label), dtype=torch.long)
    overrides = {k: v for k, v in sampling_overrides(args).items() if k != "seed"}
    print(f"sampling {args.n} through {len(stages)} stages at augmentation level {config.aug_level:g}"
          + (" (truncated)" if config.truncated else ""), file=sys.stderr)
    outputs = sample_cascade(stages, args.n, config.aug_level, config.truncated, class_condition(labels), overrides,
                             args.device, args.seed if args.seed is not None else 0)
    for k, images in enumerate(outputs):
        name = args.name if k == len(outputs) - 1 else f"{args.name}_stage{k}"
        for path in save_samples(images, args.out, name, labels, columns=args.nrow, scale=args.scale,
                                 each=args.each and k == len(outputs) - 1):
            print(path)
    return 0


def sample_unclip_file(args: argparse.Namespace) -> int:
    """``difflab sample UNCLIP.yaml --prompt TEXT``: caption -> prior -> decoder (``difflab.pipelines.unclip``)."""
    from difflab.pipelines.ddpm import save_samples
    from difflab.pipelines.text import repeat_prompts
    from difflab.pipelines.unclip import load_pipeline, load_unclip_file, sample_unclip

    config = load_unclip_file(args.checkpoint)
    if not args.prompt:
        raise DifflabError("an unCLIP pipeline draws images for captions: give --prompt TEXT (repeatable)")
    if args.class_label is not None or args.init_image is not None or args.control is not None:
        raise DifflabError("an unCLIP pipeline takes captions alone (--prompt), not --class, --init-image or --control")
    pipeline = load_pipeline(config, args.weights, args.device)
    prompts = repeat_prompts(args.prompt, args.n)
    overrides = {k: v for k, v in sampling_overrides(args).items() if k != "seed"}
    print(f"sampling {args.n} through the unCLIP prior {pipeline.prior.model.path} (best of "
          f"{config.prior_candidates}) and decoder {pipeline.decoder.model.path}; prompts: "
          + " | ".join(args.prompt), file=sys.stderr)
    result = sample_unclip(pipeline, prompts, overrides, args.seed if args.seed is not None else 0, args.device)
    for path in save_samples(result.images, args.out, args.name, columns=args.nrow, scale=args.scale, each=args.each):
        print(path)
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    """``difflab vary DECODER IMAGE.png``: the image's CLIP embedding decoded ``--n`` times (unCLIP variations)."""
    import torch

    from difflab.data.folder import load_image
    from difflab.pipelines.ddpm import save_samples
    from difflab.pipelines.text import repeat_prompts
    from difflab.pipelines.unclip import load_stage, variations

    if args.nrow is not None and args.nrow < 1 or args.scale < 1:
        raise DifflabError("--nrow and --scale must be at least 1")
    decoder = load_stage(args.decoder, "decoder", args.weights, args.device)
    channels, size, _ = decoder.clip.image_shape              # square; the image is resized and centre-cropped
    image = torch.tensor(load_image(args.image, size, channels))[None].float() / 127.5 - 1
    options = dataclasses.replace(decoder.model.config.sample, **sampling_overrides(args))
    prompts = repeat_prompts(args.prompt, args.n) if args.prompt else None
    print(f"{args.n} variations of {args.image} from {decoder.model.path} (step {decoder.model.step})",
          file=sys.stderr)
    samples = variations(decoder, image, args.n, options, prompts, args.device)
    for path in save_samples(samples, args.out, args.name, columns=args.nrow, scale=args.scale, each=args.each):
        print(path)
    return 0


def control_condition(args: argparse.Namespace, loaded, cond):
    """The condition record with ``--control`` (hint files) or ``--control-from`` (images) for ``--n`` samples."""
    from difflab.pipelines.control import control_images, with_control

    if args.control is not None and args.control_from is not None:
        raise DifflabError("--control and --control-from both give the control images: choose one")
    path = args.control if args.control is not None else args.control_from
    hints = control_images(loaded.spec, path, args.n, from_images=args.control_from is not None)
    return with_control(cond, hints), hints


def edit_images(args: argparse.Namespace, loaded, options, cond):
    """``--init-image`` (SDEdit at ``--strength``) or, with ``--mask``, inpainting (RePaint), ``--n`` variations."""
    import torch

    from difflab.data.folder import load_image
    from difflab.pipelines.editing import image_to_image, inpaint

    if not loaded.spec.is_image:
        raise DifflabError(f"--init-image: {loaded.path} is not an image model")
    channels, size, _ = loaded.spec.image_shape               # square; images are resized and centre-cropped
    image = torch.from_numpy(load_image(args.init_image, size, channels))[None].float() / 127.5 - 1
    image = image.expand(args.n, -1, -1, -1)
    if args.mask is None:
        return image_to_image(loaded, image, args.strength, options, cond, args.device, progress=True)
    known = 1 - torch.from_numpy(load_image(args.mask, size, 1))[None].float() / 255         # white: repaint
    return inpaint(loaded, image, known.expand(args.n, -1, -1, -1), options, args.resample, cond, args.device,
                   progress=True)


def cmd_interpolate(args: argparse.Namespace) -> int:
    """Rows of DDIM decodings of slerped latents: between random latents, or between test images' inversions."""
    import torch

    from difflab.build import build_data
    from difflab.data import to_uint8_images
    from difflab.imageio import save_grid
    from difflab.pipelines.ddpm import load_model
    from difflab.pipelines.interpolate import decode, interpolate, invert, random_latents

    loaded = load_model(args.checkpoint, args.weights, "cpu")
    config, denoiser = loaded.config, loaded.denoiser
    if not loaded.spec.is_image or loaded.spec.conditions or loaded.spec.is_latent:
        raise DifflabError(f"interpolate: needs an unconditional pixel-space image model, {loaded.path} is not one")
    count = 2 * args.pairs
    if args.test_images:
        data = build_data(config.data, split="test")
        images, _ = data.batch(torch.arange(args.seed, args.seed + count) % len(data))
        latents = invert(denoiser, images, args.steps)
        error = (decode(denoiser, latents, args.steps) - images).pow(2).mean().sqrt().item()
        print(f"DDIM inversion of {count} test images with {args.steps} steps: reconstruction RMSE {error:.4f} "
              f"(pixel range [-1, 1])", file=sys.stderr)
    else:
        latents = random_latents(loaded.spec.sample_shape, range(args.seed, args.seed + count))
    frames = decode(denoiser, interpolate(latents[0::2], latents[1::2], args.frames), args.steps, clip_x0=True)
    path = save_grid(to_uint8_images(frames), Path(args.out) / f"{args.name}.png", columns=args.frames, scale=2)
    print(path)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from difflab.presets import resolve_config
    from difflab.train.classifier import train_classifier_from_yaml

    result = train_classifier_from_yaml(resolve_config(args.config), args.set, progress=not args.quiet,
                                        resume=args.resume, overwrite=args.overwrite)
    print(f"trained the noise-aware classifier to step {result.step} (stopped by {result.stopped_by}); "
          f"test accuracy by timestep {json.dumps(result.accuracy)}; {result.checkpoint}")
    return 0


def cmd_train_clip(args: argparse.Namespace) -> int:
    from difflab.presets import resolve_config
    from difflab.train.clip import train_clip_from_yaml

    result = train_clip_from_yaml(resolve_config(args.config), args.set, progress=not args.quiet,
                                  resume=args.resume, overwrite=args.overwrite)
    e = result.evaluation
    scores = (f"test image->caption top-1 among {e['captions']} captions by timestep "
              f"{json.dumps(e['retrieval_top1'])}, caption-class accuracy {json.dumps(e['class_accuracy'])}; "
              if e else "")
    print(f"trained the noise-aware CLIP to step {result.step} (stopped by {result.stopped_by}); {scores}"
          f"{result.checkpoint}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """A run's training curves (loss, learning rate, throughput, preview FID) to a PNG."""
    from difflab.pipelines.plot import plot_run

    print(plot_run(args.run, args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A web page to sample the runs (``difflab.pipelines.web_demo``), served until Ctrl-C."""
    from difflab.pipelines.web_demo import demo_server

    server = demo_server(args.runs, args.host, args.port, args.device)
    print(f"serving {len(server.demo.runs)} run(s) on {args.device} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """The shipped experiment presets, each with the first line of its comment."""
    from difflab.presets import describe, presets, presets_dir

    known = presets()
    width = max(map(len, known), default=0)
    for name, path in known.items():
        print(f"{name:<{width}}  {describe(path)}")
    print(f"{len(known)} presets in {presets_dir()}; run one with `difflab train NAME`", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's U-Net as a diffusers folder (``difflab.pipelines.diffusers_export``); a model that does not map is
    refused in one line naming the config field at fault."""
    from difflab.pipelines.diffusers_export import export_diffusers

    print(export_diffusers(args.checkpoint, args.out, args.weights, args.overwrite))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from difflab.checkpoint import load_checkpoint, load_weights
    from difflab.config import to_dict
    from difflab.model import denoiser_from_spec
    from difflab.pipelines.ddpm import model_spec_of

    checkpoint = load_checkpoint(args.checkpoint)
    if "autoencoder" in checkpoint.metadata and "model" not in checkpoint.metadata:
        return autoencoder_info(checkpoint)
    spec = model_spec_of(checkpoint)
    net = denoiser_from_spec(spec).net                  # info loads what it reports
    for weights in ("model", "ema") if checkpoint.has_ema else ("model",):
        load_weights(net, checkpoint, weights)
        bad = [name for name, value in net.state_dict().items() if not torch.isfinite(value).all()]
        if bad:
            raise DifflabError(f"{checkpoint.path}: {weights} weights hold non-finite values ({bad[0]}, ...)")
    parameters = sum(p.numel() for p in net.parameters())
    info = {"path": str(checkpoint.path), "state": {k: v for k, v in checkpoint.state.items()
                                                      if k != "param_groups"},
            "parameters": parameters, "has_ema": checkpoint.has_ema, "model": spec.to_json() | {
                "precond": {k: v for k, v in spec.precond.items() if k != "betas"}},
            "config": to_dict(checkpoint.config)}
    print(json.dumps(info, indent=2))
    return 0


def autoencoder_info(checkpoint) -> int:
    from difflab.config import to_dict
    from difflab.latent import LatentSpace

    record = checkpoint.metadata["autoencoder"]
    space = LatentSpace.from_checkpoint(checkpoint, {**record, "scale": record.get("scale") or 1.0}, "model")
    if checkpoint.has_ema:
        LatentSpace.from_checkpoint(checkpoint, {**record, "scale": 1.0}, "ema")
    info = {"path": str(checkpoint.path), "state": {k: v for k, v in checkpoint.state.items() if k != "param_groups"},
            "parameters": sum(p.numel() for p in space.autoencoder.parameters()), "has_ema": checkpoint.has_ema,
            "autoencoder": record, "latent_shape": list(space.latent_shape), "config": to_dict(checkpoint.config)}
    print(json.dumps(info, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.pipelines.evaluate import (EvalOptions, default_report_path, evaluate, evaluate_samples,
                                            to_json, write_report)

    if (args.checkpoint is None) == (args.samples is None):
        raise DifflabError("eval: give either a checkpoint or --samples FILE.npz, not both or neither")
    if args.samples is not None and args.nll:
        raise DifflabError("--nll needs a checkpoint (bits/dim are a property of the model, not of samples)")
    if args.nll < 0:
        raise DifflabError(f"--nll {args.nll}: must be a number of test images >= 0")
    if args.reference is not None and args.nll:
        raise DifflabError("--nll scores Fashion-MNIST's test images; it cannot be combined with --reference")
    options = EvalOptions(n=args.n, nll=args.nll, cache_dir=args.cache_dir, reference=args.reference,
                          inception_weights=args.inception_weights)
    if args.samples is not None:
        report = evaluate_samples(args.samples, options)
    else:
        report = evaluate(args.checkpoint, options, sampling_overrides(args), args.weights, args.device, args.save_samples)
    path = write_report(report, args.out or default_report_path(report))
    print(to_json(report["metrics"]))
    print(f"wrote {path}", file=sys.stderr)
    return 0


SAMPLING_OPTIONS = ("sampler", "steps", "spacing", "sigmas", "eta", "variance", "seed", "batch_size", "guidance",
                    "sigma_min", "sigma_max", "langevin_steps", "step_size", "snr", "classifier",
                    "classifier_scale", "clip", "clip_scale", "control_scale")
THRESHOLDS = {"none": {"clip_x0": False, "dynamic_threshold": None},
              "static": {"clip_x0": True, "dynamic_threshold": None},
              "dynamic": {"clip_x0": False, "dynamic_threshold": 0.995}}


def noise_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of noise levels") from None


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``sample`` and ``eval``; each left unset keeps the checkpoint config's value."""
    from difflab.samplers import SAMPLERS, SPACINGS

    parser = parser.add_argument_group("sampling options",
                                       "an option left unset keeps the value in the checkpoint's config")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampler (default: the config's)")
    parser.add_argument("--steps", default=None, help="number of steps, or sections like 10,10,20 (ancestral)")
    parser.add_argument("--spacing", choices=sorted(SPACINGS), default=None,
                        help="noise levels of the sigma-space samplers (karras, logsnr, uniform, leading, trailing)")
    parser.add_argument("--sigma-min", type=float, default=None, help="karras/logsnr: smallest noise level")
    parser.add_argument("--sigma-max", type=float, default=None, help="karras/logsnr: largest noise level")
    parser.add_argument("--sigmas", type=noise_levels, default=None, metavar="S1,S2,...",
                        help="an explicit decreasing grid of noise levels (a final 0 is added): replaces --steps")
    parser.add_argument("--grid", type=Path, default=None, metavar="FILE.json",
                        help="a grid written by `difflab tune-grid`: its sampler and noise levels")
    parser.add_argument("--eta", type=float, default=None, help="DDIM / ancestral-Euler noise, 0 to 1")
    parser.add_argument("--langevin-steps", type=int, default=None,
                        help="langevin: steps per noise level; pc: corrector steps per level")
    parser.add_argument("--step-size", type=float, default=None,
                        help="langevin: epsilon of Song & Ermon 2019, Alg. 1 (step = epsilon sigma_i^2 / sigma_L^2)")
    parser.add_argument("--snr", type=float, default=None, help="pc: corrector signal-to-noise ratio r")
    parser.add_argument("--variance", choices=("beta", "beta_tilde"), default=None,
                        help="reverse-process variance of the ancestral sampler")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first sample (sample i: seed+i)")
    parser.add_argument("--batch-size", type=int, default=None, help="sampling batch size")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance weight w (diffusers' guidance_scale = 1 + w)")
    parser.add_argument("--control-scale", dest="control_scale", type=float, default=None,
                        help="ControlNet models: scale of the control residuals (1: as trained, 0: the base model)")
    parser.add_argument("--classifier", default=None, metavar="CKPT",
                        help="noise-aware classifier (difflab train-classifier) for classifier guidance")
    parser.add_argument("--classifier-scale", type=float, default=None,
                        help="classifier guidance gradient scale s (Dhariwal & Nichol 2021)")
    parser.add_argument("--clip", default=None, metavar="RUN_OR_FILE",
                        help="noise-aware CLIP (difflab train-clip) for CLIP guidance towards the --prompt captions "
                             "(GLIDE); combines with --guidance")
    parser.add_argument("--clip-scale", dest="clip_scale", type=float, default=None,
                        help="CLIP guidance gradient scale s (default: 1 with --clip; 0: unguided)")
    parser.add_argument("--threshold", choices=sorted(THRESHOLDS), default=None,
                        help="x0 thresholding: static clip to [-1, 1], dynamic (p = 0.995), or none")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the checkpoint's EMA weights or its raw model weights")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    overrides = {name: getattr(args, name) for name in SAMPLING_OPTIONS if getattr(args, name) is not None}
    if getattr(args, "grid", None) is not None:
        from difflab.pipelines.grid_search import load_grid

        if args.sigmas is not None:
            raise DifflabError("--grid and --sigmas both set the noise levels: give one")
        sampler, sigmas = load_grid(args.grid)
        overrides.update(sampler=overrides.get("sampler", sampler), sigmas=sigmas)
    return {**overrides, **THRESHOLDS.get(args.threshold, {})}


def cmd_tune_grid(args: argparse.Namespace) -> int:
    from difflab.pipelines.grid_search import tune_grid

    result = tune_grid(args.checkpoint, args.sampler, args.nfe, args.n, args.criterion, args.reference_steps,
                       sigma_max=args.sigma_max, seed=args.seed, device=device_option(args.device), out=args.out,
                       progress=not args.quiet)
    print(json.dumps({k: result[k] for k in ("sampler", "nfe", "sigmas", "loss", "start_loss")}))
    print(f"wrote {args.out or Path(result['checkpoint']).parent / 'grids' / f'{args.sampler}_nfe{args.nfe}.json'}; "
          f"sample with --grid FILE", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from difflab import __version__

    parser = argparse.ArgumentParser(prog="difflab", description="Train, sample and inspect diffusion models.")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", metavar="CONFIG",
                       help="experiment YAML file, or the name of a preset (see `difflab presets`)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=100 (repeatable)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                       help="continue from the run's checkpoint (or the one given); fails if missing")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in a train.out_dir that already holds a run (its checkpoint is replaced)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    train_classifier = sub.add_parser("train-classifier",
                                      help="train a noise-aware classifier p(y | x_t, t) for classifier guidance")
    train_classifier.add_argument("config", metavar="CONFIG",
                                  help="experiment YAML file or preset name (fmnist_noisy_classifier)")
    train_classifier.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                                  help="override a config value (repeatable)")
    train_classifier.add_argument("--resume", action="store_true",
                                  help="continue exactly from the run's classifier file; fails if missing")
    train_classifier.add_argument("--overwrite", action="store_true",
                                  help="start afresh in an out_dir that already holds a classifier")
    train_classifier.add_argument("--quiet", action="store_true", help="no progress bar")
    train_classifier.set_defaults(func=cmd_train_classifier)

    train_clip = sub.add_parser("train-clip", help="train a noise-aware CLIP (image and caption embeddings of "
                                                   "x_t) for CLIP guidance")
    train_clip.add_argument("config", metavar="CONFIG", help="experiment YAML file or preset name (fmnist_clip)")
    train_clip.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value (repeatable)")
    train_clip.add_argument("--resume", action="store_true",
                            help="continue exactly from the run's CLIP file; fails if missing")
    train_clip.add_argument("--overwrite", action="store_true",
                            help="start afresh in an out_dir that already holds a CLIP")
    train_clip.add_argument("--quiet", action="store_true", help="no progress bar")
    train_clip.set_defaults(func=cmd_train_clip)

    sample = sub.add_parser("sample", help="draw samples from a checkpoint")
    sample.add_argument("checkpoint", type=Path, nargs="?",
                        help="checkpoint file or run folder, or a cascade's or an unCLIP pipeline's YAML file")
    sample.add_argument("--diffusers", type=Path, default=None, metavar="DIR",
                        help="sample a diffusers model folder (UNet2DModel and its scheduler) instead of a checkpoint")
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--out", type=Path, default=Path("samples"), help="output folder")
    sample.add_argument("--name", default="samples", help="file name stem for the .png and .npz")
    add_sampling_arguments(sample)
    sample.add_argument("--class", dest="class_label", default=None,
                        help="class to sample: a number, or a name such as Sneaker (class-conditional models)")
    sample.add_argument("--prompt", action="append", default=None,
                        help="caption to sample (text-to-image models); repeat for several, taken in turn, so "
                             "--nrow equal to their number gives one column per prompt; no prompt: the empty caption")
    sample.add_argument("--nrow", type=int, default=None, help="images per row of the grid (default: a square)")
    sample.add_argument("--scale", type=int, default=1, help="enlarge the grid's pixels by this factor")
    sample.add_argument("--each", action="store_true", help="also write one PNG per sample into OUT/NAME/")
    sample.add_argument("--init-image", type=Path, default=None, metavar="PNG",
                        help="edit this image (SDEdit image-to-image; with --mask, inpainting)")
    sample.add_argument("--strength", type=float, default=0.6,
                        help="SDEdit: the fraction of the sampler's grid run from the noised image (0: unchanged, "
                             "1: a new sample)")
    sample.add_argument("--mask", type=Path, default=None, metavar="PNG",
                        help="inpainting (RePaint): white pixels are generated, black ones kept exactly")
    sample.add_argument("--resample", type=int, default=5, help="RePaint: resampling steps per level (U)")
    sample.add_argument("--aug-level", dest="aug_level", type=float, default=None,
                        help="cascades: the noise-conditioning augmentation level in [0, 1) (default: the file's)")
    sample.add_argument("--truncated", action="store_true",
                        help="cascades: stop each stage's sampler at the augmentation level (truncated conditioning)")
    sample.add_argument("--control", type=Path, default=None, metavar="PNG|DIR",
                        help="ControlNet models: control image(s) as they are (e.g. white edges on black), used in "
                             "turn for the --n samples")
    sample.add_argument("--control-from", dest="control_from", type=Path, default=None, metavar="PNG|DIR",
                        help="ControlNet models: compute the control images from these ordinary images with the "
                             "model's hint (e.g. their Canny edges)")
    sample.set_defaults(func=cmd_sample)

    vary = sub.add_parser("vary", help="unCLIP variations: decode an image's CLIP embedding with an unCLIP decoder")
    vary.add_argument("decoder", type=Path, help="the unCLIP decoder's run folder or checkpoint (unclip.stage decoder)")
    vary.add_argument("image", type=Path, help="the image (PNG, JPEG, ...); resized and centre-cropped to the CLIP's")
    vary.add_argument("--n", type=int, default=8, help="number of variations")
    vary.add_argument("--prompt", action="append", default=None,
                      help="a caption for a decoder that reads captions too (default: the empty caption)")
    vary.add_argument("--out", type=Path, default=Path("samples"), help="output folder")
    vary.add_argument("--name", default="variations", help="file name stem for the .png and .npz")
    add_sampling_arguments(vary)
    vary.add_argument("--nrow", type=int, default=None, help="images per row of the grid (default: a square)")
    vary.add_argument("--scale", type=int, default=1, help="enlarge the grid's pixels by this factor")
    vary.add_argument("--each", action="store_true", help="also write one PNG per sample into OUT/NAME/")
    vary.set_defaults(func=cmd_vary)

    interp = sub.add_parser("interpolate", help="DDIM interpolation between latents or inverted test images")
    interp.add_argument("checkpoint", type=Path, help="checkpoint file or run folder")
    interp.add_argument("--pairs", type=int, default=4, help="rows: pairs of end points")
    interp.add_argument("--frames", type=int, default=8, help="columns: images per row, end points included")
    interp.add_argument("--steps", type=int, default=50, help="DDIM steps for inversion and decoding")
    interp.add_argument("--seed", type=int, default=0, help="first latent seed, or first test image index")
    interp.add_argument("--test-images", action="store_true",
                        help="interpolate between DDIM inversions of test images instead of random latents")
    interp.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the checkpoint's EMA weights or its raw model weights")
    interp.add_argument("--out", type=Path, default=Path("samples"), help="output folder")
    interp.add_argument("--name", default="interpolation", help="file name stem of the .png")
    interp.set_defaults(func=cmd_interpolate)

    demo = sub.add_parser("demo", help="a web page to sample runs: pick sampler, steps, class, guidance, seed")
    demo.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders or checkpoint files")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (0: a free one)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    demo.set_defaults(func=cmd_demo)

    presets = sub.add_parser("presets", help="list the shipped experiment presets (difflab train NAME)")
    presets.set_defaults(func=cmd_presets)

    plot = sub.add_parser("plot", help="draw a run's loss, learning-rate and throughput curves to RUN/curves.png")
    plot.add_argument("run", type=Path, help="the run folder (its metrics.jsonl)")
    plot.add_argument("--out", type=Path, default=None, help="the PNG to write (default: RUN/curves.png)")
    plot.set_defaults(func=cmd_plot)

    export = sub.add_parser("export", help="write a run's U-Net as a diffusers model folder (UNet2DModel + scheduler)")
    export.add_argument("checkpoint", type=Path, help="checkpoint file or run folder")
    export.add_argument("--format", choices=("diffusers",), default="diffusers", help="the folder's library")
    export.add_argument("--out", type=Path, default=None, help="the folder to write (default: RUN/diffusers)")
    export.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the checkpoint's EMA weights or its raw model weights")
    export.add_argument("--overwrite", action="store_true", help="replace the files of an existing export folder")
    export.set_defaults(func=cmd_export)

    info = sub.add_parser("info", help="describe a checkpoint")
    info.add_argument("checkpoint", type=Path)
    info.set_defaults(func=cmd_info)

    evaluate = sub.add_parser("eval", help="FID/KID/precision/recall (and bits/dim) against Fashion-MNIST's test set")
    evaluate.add_argument("checkpoint", type=Path, nargs="?", help="checkpoint file or run folder to sample")
    evaluate.add_argument("--samples", type=Path, default=None, metavar="FILE.npz",
                          help="score saved samples instead (npz key 'images', uint8 NHWC; optional 'labels')")
    evaluate.add_argument("--n", type=int, default=10000, help="number of samples to draw")
    add_sampling_arguments(evaluate)
    evaluate.add_argument("--nll", type=int, default=0, metavar="N", help="also bits/dim on N test images")
    evaluate.add_argument("--out", type=Path, default=None,
                          help="report path (default: eval_<sampler>_<steps>steps_n<N>.json beside the checkpoint)")
    evaluate.add_argument("--save-samples", type=Path, default=None, metavar="FILE.npz",
                          help="also keep the drawn samples")
    evaluate.add_argument("--reference", type=Path, default=None, metavar="DIR",
                          help="score against the images of this folder instead of Fashion-MNIST's test set")
    evaluate.add_argument("--inception-weights", dest="inception_weights", type=Path, default=None, metavar="FILE",
                          help="the standard FID's Inception-v3 weights (pt_inception-2015-12-05 or torch-fidelity's; "
                               "needs pytorch-fid or torch-fidelity) instead of the shipped Fashion-MNIST features")
    evaluate.add_argument("--cache-dir", type=Path, default=None,
                          help="reference statistics cache (default: $DIFFLAB_CACHE/stats or ~/.cache/difflab/stats)")
    evaluate.set_defaults(func=cmd_eval)

    from difflab.pipelines.grid_search import CRITERIA, ODE_SAMPLERS
    tune = sub.add_parser("tune-grid", help="optimise an ODE sampler's noise levels for a model and a budget "
                                            "(no data: matching the model's own fine ODE solutions)")
    tune.add_argument("checkpoint", type=Path, help="checkpoint file or run folder")
    tune.add_argument("--sampler", choices=ODE_SAMPLERS, default="dpmpp-2m", help="the solver (default: dpmpp-2m)")
    tune.add_argument("--nfe", type=int, default=5, help="network evaluations per sample (default: 5)")
    tune.add_argument("--n", type=int, default=256, help="samples the criterion averages over (default: 256)")
    tune.add_argument("--criterion", choices=CRITERIA, default="trajectory",
                      help="mean distance (default) or mean squared distance to the reference solutions")
    tune.add_argument("--reference-steps", type=int, default=100, help="steps of the reference solve (default: 100)")
    tune.add_argument("--sigma-max", type=float, default=None, help="largest level allowed (default: the preset's)")
    tune.add_argument("--seed", type=int, default=1_000_000, help="seed of the first search sample (default: 1000000)")
    tune.add_argument("--out", type=Path, default=None, help="grid file (default: RUN/grids/<sampler>_nfe<N>.json)")
    tune.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.set_defaults(func=cmd_tune_grid)
    for command in sub.choices.values():
        command.formatter_class = DefaultsHelpFormatter
    return parser


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none worth printing (None, an off flag, an empty
    list) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        nothing = action.default is None or action.default is False or action.default == []
        return action.help if nothing or "default" in (action.help or "") else super()._get_help_string(action)


def device_option(name: str) -> str:
    """``--device``: cpu, cuda, cuda:N, or auto (cuda when torch sees one)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DifflabError(f"--device {name}: torch sees no CUDA device (use cpu or auto)")
        return name
    raise DifflabError(f"--device {name!r}: choose cpu, cuda, cuda:N or auto")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", None) is not None and str(args.steps).isdigit():
        args.steps = int(args.steps)
    if getattr(args, "n", 1) is not None and getattr(args, "n", 1) < 1:
        print("difflab: error: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        if getattr(args, "device", None) is not None:
            args.device = device_option(args.device)
        return args.func(args)
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                  # Ctrl-C outside a training loop (which handles its own)
        print("\ndifflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
