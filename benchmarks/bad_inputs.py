"""Bad input and faults, tried as a hostile but fair user would: each case runs the ``difflab`` command (in
this process, ``difflab.cli.main``) and records its outcome: OK (the command did what it should), a clear error
(exit code 2 and one line ``difflab: error: ...``), or FAIL (a traceback, another exit code, a lost file).
Writes ``docs/reliability.md`` (case -> outcome) and ``benchmarks/results/bad_inputs.json``.

    python benchmarks/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import traceback
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, write_results  # noqa: E402

from difflab.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "configs/toy.yaml")
SMALL = ["--set", "model.mlp.hidden=16", "--set", "train.sample_every=1000000", "--quiet"]


def run(args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``difflab ARGS``; an escaping exception is a traceback (code 1)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as e:                       # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:                          # noqa: BLE001 (what a user would see as a traceback)
            traceback.print_exc(file=err)
            code = 1
    return code, err.getvalue()


def outcome(code: int, stderr: str, expect_ok: bool) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("difflab: error:")]
    if "Traceback" in stderr:
        return "FAIL (traceback)"
    if expect_ok:
        return "OK" if code == 0 else f"FAIL (exit {code})"
    if code == 2 and len(lines) == 1:
        return "clear error: " + lines[0].removeprefix("difflab: error: ")[:140]
    if code == 2 and "usage:" in stderr:              # argparse: exit 2 and a usage line naming the option
        return "clear error: " + stderr.strip().splitlines()[-1][:140]
    return f"FAIL (exit {code}: {stderr.strip().splitlines()[-1][:100] if stderr.strip() else 'no message'})"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb), with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def main_table() -> list[tuple[str, str, str]]:
    work = Path(tempfile.mkdtemp(prefix="difflab_bad_"))
    rows: list[tuple[str, str, str]] = []

    def case(group: str, name: str, args: list[str], expect_ok: bool = False, check=None) -> None:
        code, stderr = run(args)
        result = outcome(code, stderr, expect_ok)
        if check is not None and not result.startswith("FAIL"):
            problem = check()
            if problem:
                result = f"FAIL ({problem})"
        rows.append((group, name, result))
        print(f"{group:10s} {name:50s} {result}", file=sys.stderr)

    run_dir = work / "run"
    train = ["train", TOY, *SMALL, "--set", f"train.out_dir={run_dir}"]
    case("setup", "train a 30-step toy run", train + ["--set", "train.steps=30"], expect_ok=True)
    checkpoint = run_dir / "checkpoint.safetensors"
    good = checkpoint.read_bytes()

    # -- configs and --set overrides -------------------------------------------------------------------------------
    def fresh(name: str) -> list[str]:                  # a run folder of its own for each case
        return ["train", TOY, *SMALL, "--set", f"train.out_dir={work / 'fresh' / name}"]
    for setting in ["train.batch_size=0", "train.batch_size=-1", "train.checkpoint_every=0", "train.log_every=0",
                    "diffusion.timesteps=0", "train.lr=-1", "train.weight_decay=-0.1", "train.adam_betas=[0.9,1.5]",
                    "train.steps=0", "train.steps=-5", "train.warmup_steps=-10", "model.mlp.hidden=0",
                    "train.label_dropout=2", "train.steps=[1,", "train.steps=many", "train.nonfinite=maybe",
                    "train.lr_schedule=sometimes", "train.loss=magic", "diffusion.prediction=score",
                    "diffusion.schedule=quadratic", "diffusion.precond=ve", "model.kind=transformer",
                    "model.mlp.width=3", "data.dataset=imagenet", "data.num_points=0", "train.device=tpu",
                    "train.precision=fp8", "train.precision=fp16", "train.grad_accumulation=0",
                    "train.batch_size=1.5", "sample.eta=5", "sample.steps=0", "unknown.key=1", "train=3"]:
        case("config", f"--set {setting}", fresh(setting) + ["--set", setting])
    case("config", "lr: 1e-3 in YAML (no dot)", fresh("lr") + ["--set", "train.lr=1e-3", "--set", "train.steps=2"],
         expect_ok=True)
    (work / "empty.yaml").write_text("")
    case("config", "empty YAML file", ["train", str(work / "empty.yaml")])
    (work / "broken.yaml").write_text("train: [1, 2\n")
    case("config", "invalid YAML", ["train", str(work / "broken.yaml")])
    case("config", "missing config file", ["train", str(work / "nothing.yaml")])
    unet = ["train", str(REPO / "configs/fashion_mnist.yaml"), "--quiet", "--set", f"train.out_dir={work / 'u'}",
            "--set", "data.dataset=folder", "--set", f"data.path={work / 'images'}"]
    (work / "images").mkdir()
    from PIL import Image
    for i in range(4):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(work / "images" / f"{i}.png")
    case("config", "U-Net with data.image_size 3", unet + ["--set", "data.image_size=3"])
    for channels in (0, 2, 4):
        case("config", f"data.channels {channels}", unet + ["--set", "data.image_size=8", "--set",
                                                             f"data.channels={channels}"])
    case("config", "data.image_size 0", unet + ["--set", "data.image_size=0"])
    case("config", "gradient checkpointing on an MLP", fresh("gc") + ["--set", "train.gradient_checkpointing=true"])

    # -- data ------------------------------------------------------------------------------------------------------
    (work / "bomb").mkdir()
    (work / "bomb" / "big.png").write_bytes(png_header(30000, 30000))
    case("data", "30000x30000 PNG header (decompression bomb)", unet[:-1] + [f"data.path={work / 'bomb'}",
                                                                            "--set", "data.image_size=8"])
    (work / "corrupt").mkdir()
    (work / "corrupt" / "x.png").write_bytes(b"not a png at all")
    case("data", "corrupt image file", unet[:-1] + [f"data.path={work / 'corrupt'}", "--set", "data.image_size=8"])
    case("data", "missing image folder", unet[:-1] + [f"data.path={work / 'none'}", "--set", "data.image_size=8"])
    (work / "emptydir").mkdir()
    case("data", "empty image folder", unet[:-1] + [f"data.path={work / 'emptydir'}", "--set", "data.image_size=8"])

    # -- sampling options ------------------------------------------------------------------------------------------
    sample = ["sample", str(run_dir), "--n", "4", "--out", str(work / "samples")]
    case("sample", "defaults", sample, expect_ok=True)
    for option in (["--batch-size", "0"], ["--eta", "5"], ["--step-size", "-1"], ["--seed", "1e23"],
                   ["--device", "tpu"], ["--device", "cuda"], ["--langevin-steps", "0", "--sampler", "langevin"],
                   ["--snr", "-1", "--sampler", "pc"], ["--class", "3"], ["--steps", "0"], ["--steps", "abc"],
                   ["--n", "0"], ["--sampler", "magic"], ["--guidance", "2"], ["--spacing", "uniform", "--sampler",
                                                                             "heun", "--sigma-min", "0.1"],
                   ["--classifier-scale", "2", "--class", "1"]):
        case("sample", " ".join(option), sample + option)
    case("sample", "--out an unwritable path", ["sample", str(run_dir), "--n", "4", "--out", "/proc/difflab"])
    case("sample", "missing checkpoint", ["sample", str(work / "nothing"), "--n", "4"])

    # -- checkpoints -------------------------------------------------------------------------------------------------
    bad = work / "bad.safetensors"
    for name, data in [("random bytes", os.urandom(4096)), ("truncated", good[:len(good) // 2]),
                       ("empty file", b"")]:
        bad.write_bytes(data)
        case("checkpoint", f"{name}: sample", ["sample", str(bad), "--n", "2", "--out", str(work / "s2")])
        case("checkpoint", f"{name}: info", ["info", str(bad)])
    flipped = bytearray(good)
    flipped[-100] ^= 0x10
    bad.write_bytes(bytes(flipped))
    case("checkpoint", "one flipped bit in a tensor: info", ["info", str(bad)])
    case("checkpoint", "one flipped bit in a tensor: resume", train + ["--resume", str(bad)])
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    tensors = load_file(str(checkpoint))
    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    for name, change in [("state is a list", {"state": "[1, 2]"}), ("step is 'many'", {"state": '{"step": "many"}'}),
                         ("config is not JSON", {"config": "{"}), ("no model record", {"model": None})]:
        meta = {k: v for k, v in {**metadata, **change}.items() if v is not None}
        meta.pop("sha256", None)
        save_file(tensors, str(bad), metadata=meta)
        case("checkpoint", f"{name}: info", ["info", str(bad)])
        case("checkpoint", f"{name}: resume", ["train", TOY, *SMALL, "--set", f"train.out_dir={work / name}",
                                                "--resume", str(bad), "--set", "train.steps=40"],
             expect_ok=name == "no model record")                # resuming needs only the config and tensors
    nan = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = dict(metadata)
    meta.pop("sha256")
    save_file(nan, str(bad), metadata=meta)
    case("checkpoint", "all-NaN weights: info", ["info", str(bad)])
    case("checkpoint", "all-NaN weights: sample", ["sample", str(bad), "--n", "2", "--out", str(work / "s3")])

    # -- eval inputs -------------------------------------------------------------------------------------------------
    npz = work / "samples.npz"
    np.savez(npz, images=np.array([object()] * 8, dtype=object))
    case("eval", "object array in the npz", ["eval", "--samples", str(npz)])
    np.savez(npz, images=np.zeros((8, 28, 28, 1), dtype=np.uint8))
    npz.write_bytes(npz.read_bytes()[:200])
    case("eval", "truncated npz", ["eval", "--samples", str(npz)])
    np.savez(npz, images=np.zeros((8, 28, 28, 1), dtype=np.float32))
    case("eval", "float images", ["eval", "--samples", str(npz)])
    np.savez(npz, images=np.zeros((8, 28, 28, 1), dtype=np.uint8), labels=np.full(8, 12))
    case("eval", "labels out of range", ["eval", "--samples", str(npz)])
    case("eval", "both a checkpoint and --samples", ["eval", str(run_dir), "--samples", str(npz)])

    # -- run folders and faults ----------------------------------------------------------------------------------------
    good = checkpoint.read_bytes()
    case("run folder", "new run into a finished run folder", train + ["--set", "train.steps=5"],
         check=lambda: None if checkpoint.read_bytes() == good else "the old checkpoint changed")
    case("run folder", "--overwrite replaces it", train + ["--set", "train.steps=5", "--overwrite"], expect_ok=True)
    shutil.copytree(run_dir, work / "moved")
    case("run folder", "resume a copied folder", ["train", TOY, *SMALL, "--set", f"train.out_dir={work / 'moved'}",
                                                 "--set", "train.steps=8", "--resume"], expect_ok=True)
    (run_dir / ".lock").write_text(f"{os.getppid()}\n")
    case("run folder", "a second training while one runs (live lock)", train + ["--resume", "--set",
                                                                              "train.steps=9"])
    (run_dir / ".lock").unlink()
    case("run folder", "--resume with no checkpoint", ["train", TOY, *SMALL, "--set",
                                                      f"train.out_dir={work / 'void'}", "--resume"])
    diverge = ["train", TOY, *SMALL, "--set", f"train.out_dir={work / 'nan'}", "--set", "train.lr=1e8",
               "--set", "train.steps=300", "--set", "train.checkpoint_every=5", "--set", "train.warmup_steps=1"]
    case("faults", "train.lr=1e8 (divergence)", diverge)
    shutil.rmtree(work)
    return rows


def main_() -> None:
    rows = main_table()
    counts = {"cases": len(rows), "ok": sum(r[2] == "OK" for r in rows),
              "clear errors": sum(r[2].startswith("clear error") for r in rows),
              "failures": sum(r[2].startswith("FAIL") for r in rows)}
    lines = ["# Bad input and faults: case -> outcome", "",
             f"Made by `{command_line()}`. OK: the command did what it should; clear error: exit code 2 and one "
             f"line naming the thing at fault; FAIL: anything else. {counts['cases']} cases: {counts['ok']} OK, "
             f"{counts['clear errors']} clear errors, {counts['failures']} failures.", "",
             "Ctrl-C at random moments is `benchmarks/sigint_trials.py` (`benchmarks/results/sigint_trials.md`); "
             "kill -9, a full disk and torn writes are covered by `tests/test_reliability.py`.", "",
             "| group | case | outcome |", "|---|---|---|"]
    lines += [f"| {g} | {c.replace('|', '/')} | {o.replace('|', '/')} |" for g, c, o in rows]
    (REPO / "docs/reliability.md").write_text("\n".join(lines) + "\n")
    write_results("bad_inputs", {"counts": counts, "rows": rows, "command": command_line()}, "\n".join(lines) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main_()
