"""A web demo of ``difflab sample``: one page to pick a run, sampler, steps, class or prompt, guidance, seed and
number of images, and see the grid.

A standard-library ``ThreadingHTTPServer`` (``difflab demo RUN ...``) serves

- ``GET /``: the page (plain HTML, inline CSS and JavaScript, nothing fetched from elsewhere);
- ``GET /api/models``: the runs (name, classes, defaults) and the samplers;
- ``POST /api/sample``: JSON in (``run``, ``sampler``, ``steps``, ``class``, ``prompt``, ``guidance``, ``seed``, ``n``; each
  optional, defaulting to the run's ``sample`` section), JSON out: the grid as a PNG data URL, the seeds, the
  seconds taken.

Samples are drawn as ``difflab sample`` draws them (``load_model``, the run's ``SampleConfig`` with the request's
options, ``sample``, the grid of ``save_samples``), so the page shows the CLI's images for the same seed. Bad
input is answered with HTTP 400 and one line of JSON naming the field; other failures with 500 and one line
(the traceback goes to the server's log only).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import torch

from difflab.config import SampleConfig
from difflab.data import to_uint8_images
from difflab.errors import DifflabError
from difflab.imageio import density_image, grid_picture
from difflab.conditioning import Cond
from difflab.pipelines.ddpm import LoadedModel, class_condition, load_model, sample
from difflab.pipelines.text import is_text_model, prompt_condition
from difflab.samplers import SAMPLERS

MAX_IMAGES = 64                 # images per request
MAX_STEPS = 1000
MAX_SEED = 2 ** 53 - 1          # the largest integer a browser's JSON numbers hold exactly
MAX_BODY_BYTES = 64 * 1024
REQUEST_FIELDS = ("run", "sampler", "steps", "class", "prompt", "guidance", "seed", "n")
MAX_PROMPT_CHARS = 300


class BadRequest(DifflabError):
    """Bad input to the API: answered with HTTP 400 and the message, which starts with the field's name."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# -- the runs --------------------------------------------------------------------------------------------------

def load_runs(paths: Sequence[str | Path], device: str = "cpu") -> dict[str, LoadedModel]:
    """Each run (a run folder or checkpoint file, as ``difflab sample`` takes) by its name, the path as given;
    loaded once, here, so a missing or corrupt checkpoint stops the server before it starts."""
    if not paths:
        raise DifflabError("demo: give at least one run folder")
    return {str(Path(path)): load_model(path, device=device) for path in paths}


def class_names(loaded: LoadedModel) -> list[str]:
    """The names of the run's classes (their numbers when the data set has no names); [] if unconditional."""
    label = loaded.spec.condition_fields().get("label")
    if label is None:
        return []
    return list(label.names) if label.names else [str(i) for i in range(label.num_classes)]


def describe_run(name: str, loaded: LoadedModel) -> dict:
    """What the page needs of a run: its classes and the defaults of its ``sample`` section."""
    defaults = loaded.config.sample
    steps = defaults.steps if isinstance(defaults.steps, int) else sum(int(s) for s in defaults.steps.split(","))
    classes = class_names(loaded)
    return {"name": name, "step": loaded.step, "weights": loaded.weights, "conditional": bool(classes),
            "classes": classes, "text": is_text_model(loaded.spec), "sampler": defaults.sampler, "steps": steps, "guidance": defaults.guidance,
            "seed": defaults.seed}


# -- a request, checked ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class SampleRequest:
    run: str
    options: SampleConfig          # the run's ``sample`` section with the request's sampler, steps, guidance, seed
    labels: torch.Tensor | None    # one class id per image, or None: no class (as ``difflab sample`` without --class)
    n: int
    prompt: str | None = None      # a text-to-image run's caption (as ``difflab sample --prompt``)

    def condition(self, loaded: LoadedModel) -> Cond | None:
        if self.prompt is not None:
            return prompt_condition(loaded.denoiser, [self.prompt] * self.n)
        return class_condition(self.labels)


def integer(body: dict, field: str, default: int, low: int, high: int) -> int:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(field, f"must be an integer from {low} to {high} (got {value!r})")
    return value


def guidance_weight(body: dict, default: float) -> float:
    value = body.get("guidance", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRequest("guidance", f"must be a number of at least 0 (got {value!r})")
    return float(value)


def class_labels(loaded: LoadedModel, run: str, value, n: int) -> torch.Tensor | None:
    """``n`` copies of the class named or numbered ``value`` (resolved as ``difflab sample --class``); None for
    no class."""
    if value is None or value == "":
        return None
    label = loaded.spec.condition_fields().get("label")
    if label is None:
        raise BadRequest("class", f"{run} is not class-conditional")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRequest("class", f"must be a class name or number (got {value!r})")
    try:
        return torch.full((n,), label.class_id(str(value)), dtype=torch.long)
    except DifflabError as e:
        raise BadRequest("class", str(e)) from None


def caption(loaded: LoadedModel, run: str, value) -> str | None:
    """The prompt of a text-to-image run; None for none (the empty caption)."""
    if value is None or value == "":
        return None
    if not is_text_model(loaded.spec):
        raise BadRequest("prompt", f"{run} is not a text-to-image run")
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        raise BadRequest("prompt", f"must be a caption of at most {MAX_PROMPT_CHARS} characters")
    return value


def parse_request(body, runs: dict[str, LoadedModel]) -> SampleRequest:
    """The request's options, each checked, with the run's defaults for those it leaves out."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field (known: {', '.join(REQUEST_FIELDS)})")
    run = body.get("run", next(iter(runs)))
    if not isinstance(run, str) or run not in runs:
        raise BadRequest("run", f"unknown run {run!r} (known: {', '.join(runs)})")
    loaded, defaults = runs[run], describe_run(run, runs[run])
    sampler = body.get("sampler", defaults["sampler"])
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise BadRequest("sampler", f"unknown sampler {sampler!r} (known: {', '.join(sorted(SAMPLERS))})")
    n = integer(body, "n", 16, 1, MAX_IMAGES)
    labels = class_labels(loaded, run, body.get("class"), n)
    prompt = caption(loaded, run, body.get("prompt"))
    guidance = guidance_weight(body, defaults["guidance"])
    if guidance and labels is None and prompt is None:
        raise BadRequest("guidance", "classifier-free guidance needs a class (class-conditional run) or a prompt "
                                     "(text-to-image run)")
    steps = integer(body, "steps", 1, 1, MAX_STEPS) if "steps" in body else loaded.config.sample.steps   # maybe "10,20"
    options = dataclasses.replace(loaded.config.sample, sampler=sampler, guidance=guidance, steps=steps,
                                  seed=integer(body, "seed", defaults["seed"], 0, MAX_SEED))
    return SampleRequest(run, options, labels, n, prompt)


# -- sampling --------------------------------------------------------------------------------------------------

def grid_png(samples: torch.Tensor) -> bytes:
    """The PNG ``save_samples`` writes at its defaults: a square grid of the images, or points' density plot."""
    picture = (grid_picture(density_image(samples), padding=0) if samples.ndim == 2
               else grid_picture(to_uint8_images(samples)))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class Demo:
    """The runs, loaded once, and the two API answers. One sampling at a time: a request waits for the one before."""

    def __init__(self, runs: dict[str, LoadedModel], device: str = "cpu"):
        self.runs, self.device = runs, device
        self.sampling = threading.Lock()

    def models(self) -> dict:
        return {"runs": [describe_run(name, loaded) for name, loaded in self.runs.items()],
                "samplers": sorted(SAMPLERS), "max_images": MAX_IMAGES, "max_steps": MAX_STEPS}

    def sample(self, body) -> dict:
        request = parse_request(body, self.runs)
        with self.sampling:
            start = time.perf_counter()
            loaded = self.runs[request.run]
            samples = sample(loaded, request.n, request.options, request.condition(loaded), self.device)
            png = grid_png(samples)
            seconds = time.perf_counter() - start
        seed = request.options.seed
        return {"image": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                "seeds": list(range(seed, seed + request.n)), "seconds": round(seconds, 3), "run": request.run,
                "sampler": request.options.sampler, "steps": request.options.steps}


# -- HTTP ------------------------------------------------------------------------------------------------------

class DemoHandler(BaseHTTPRequestHandler):
    server: "DemoServer"

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self.reply(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif self.path == "/api/models":
            self.reply_json(HTTPStatus.OK, self.server.demo.models())
        else:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such page {self.path!r}"})

    def do_POST(self) -> None:
        if self.path != "/api/sample":
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such API {self.path!r} (POST /api/sample)"})
            return
        try:
            self.reply_json(HTTPStatus.OK, self.server.demo.sample(self.read_json()))
        except BadRequest as e:
            self.reply_json(HTTPStatus.BAD_REQUEST, {"error": one_line(e), "field": e.field})
        except DifflabError as e:             # the library's checks, e.g. a sampler the model cannot take
            self.reply_json(HTTPStatus.BAD_REQUEST, {"error": one_line(e), "field": None})
        except Exception as e:                # noqa: BLE001  (the client gets one line, the log the traceback)
            self.log_error("%s", traceback.format_exc())
            self.reply_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {one_line(e)}"})

    def read_json(self):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise BadRequest("body", f"needs a Content-Length of at most {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(int(length)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest("body", f"not JSON ({e})") from None

    def reply_json(self, status: HTTPStatus, value: dict) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json")

    def reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CONTENT_POLICY)
        self.end_headers()
        self.wfile.write(body)


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, demo: Demo, host: str, port: int):
        try:
            super().__init__((host, port), DemoHandler)
        except OSError as e:
            raise DifflabError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        self.demo = demo

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def demo_server(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 7860,
                device: str = "cpu") -> DemoServer:
    """The demo of ``runs``, bound (``port=0``: a free port, see ``.url``) and ready to ``serve_forever()``."""
    return DemoServer(Demo(load_runs(runs, device), device), host, port)


# -- the page --------------------------------------------------------------------------------------------------

# Only the page's own inline style and script, and requests back to this server; images are data URLs.
CONTENT_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                  "connect-src 'self'; img-src data:")

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>difflab demo</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 2em; color: #222; }
  form { display: grid; grid-template-columns: max-content 16em; gap: .4em 1em; align-items: center; }
  #status { min-height: 1.3em; }
  #status.error { color: #b00020; }
  #grid { image-rendering: pixelated; border: 1px solid #ccc; margin-top: .5em; }
</style>
</head>
<body>
<h1>difflab demo</h1>
<form id="form">
  <label for="run">checkpoint</label> <select id="run"></select>
  <label for="sampler">sampler</label> <select id="sampler"></select>
  <label for="steps">steps</label> <input id="steps" type="number" min="1" value="18">
  <label for="class">class</label> <select id="class"></select>
  <label for="prompt">prompt</label> <input id="prompt" type="text" maxlength="300" placeholder="a dark ankle boot">
  <label for="guidance">guidance w</label> <input id="guidance" type="number" min="0" step="0.1" value="0">
  <label for="seed">seed</label> <input id="seed" type="number" min="0" value="0">
  <label for="n">images</label> <input id="n" type="number" min="1" value="16">
  <span></span> <button id="generate" type="submit" disabled>Generate</button>
</form>
<p id="status" role="status">loading the runs...</p>
<img id="grid" alt="the samples" hidden>
<script>
"use strict";
const $ = id => document.getElementById(id);
let models = null;

function addOption(select, value, text) {
  const option = document.createElement("option");
  option.value = value;
  option.textContent = text;
  select.append(option);
}

function showStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function chooseRun() {
  const run = models.runs.find(r => r.name === $("run").value);
  $("sampler").value = run.sampler;
  $("steps").value = run.steps;
  $("guidance").value = run.guidance;
  $("seed").value = run.seed;
  $("class").replaceChildren();
  addOption($("class"), "", run.conditional ? "any (no class)" : "unconditional");
  run.classes.forEach((name, i) => addOption($("class"), String(i), name === String(i) ? name : i + ": " + name));
  $("class").disabled = !run.conditional;
  $("prompt").disabled = !run.text;
  $("guidance").disabled = !(run.conditional || run.text);
}

async function loadModels() {
  try {
    const reply = await fetch("/api/models");
    models = await reply.json();
    models.samplers.forEach(name => addOption($("sampler"), name, name));
    models.runs.forEach(run => addOption($("run"), run.name, run.name + " (step " + run.step + ")"));
    $("n").max = models.max_images;
    $("steps").max = models.max_steps;
    chooseRun();
    $("generate").disabled = false;
    showStatus("ready", false);
  } catch (error) {
    showStatus("cannot read the runs: " + error, true);
  }
}

async function generate(event) {
  event.preventDefault();
  const request = {run: $("run").value, sampler: $("sampler").value, steps: Number($("steps").value),
                   class: $("class").value || null, prompt: $("prompt").disabled ? null : $("prompt").value || null,
                   guidance: $("guidance").disabled ? 0 : Number($("guidance").value),
                   seed: Number($("seed").value), n: Number($("n").value)};
  $("generate").disabled = true;
  showStatus("generating...", false);
  try {
    const reply = await fetch("/api/sample", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(request)});
    const result = await reply.json();
    if (!reply.ok) throw new Error(result.error);
    $("grid").src = result.image;
    $("grid").hidden = false;
    const seeds = result.seeds;
    showStatus(seeds.length + " images of " + result.run + ": " + result.sampler + ", " + result.steps +
               " steps, seeds " + seeds[0] + "-" + seeds[seeds.length - 1] + ", " + result.seconds + " s", false);
  } catch (error) {
    showStatus(error.message || String(error), true);
  } finally {
    $("generate").disabled = false;
  }
}

$("grid").addEventListener("load", () => {       // small images enlarged, pixels kept sharp
  const image = $("grid");
  image.style.width = image.naturalWidth * Math.max(1, Math.floor(512 / image.naturalWidth)) + "px";
});
$("run").addEventListener("change", chooseRun);
$("form").addEventListener("submit", generate);
loadModels();
</script>
</body>
</html>
"""
