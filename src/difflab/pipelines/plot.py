"""Training curves of a run folder to one PNG, from its ``metrics.jsonl`` alone (``difflab plot RUN``).

One panel per series, against the training step: the loss (log scale), the learning rate, the throughput in
images/s, and the previews' FID when ``train.eval_samples`` scored them. Drawn with Pillow (no plotting
library), so it works wherever difflab does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from difflab.errors import DifflabError
from difflab.files import atomic_write

PANELS = (("loss", "loss", True), ("lr", "learning rate", False), ("images_per_s", "images/s", False),
          ("eval_fid", "FID of previews", True))
WIDTH, HEIGHT, MARGIN = 520, 220, 48


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise DifflabError(f"plot: {path} does not exist (not a run folder, or no step logged yet)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DifflabError(f"plot: {path}, line {number}: not JSON") from None
    return records


def series(records: list[dict], key: str, log: bool) -> list[tuple[float, float]]:
    """(step, value) of every record holding a finite ``key`` (positive, on a log scale)."""
    points = [(float(r["step"]), float(r[key])) for r in records
              if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [(s, v) for s, v in points if v > 0] if log else points


def draw_panel(points: list[tuple[float, float]], title: str, log: bool) -> Image.Image:
    """One line chart: the values against the step, min and max labelled on both axes."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN + 20, 20, WIDTH - 12, HEIGHT - 28
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 4), title + (" (log scale)" if log else ""), fill="black")
    steps = [s for s, _ in points]
    values = [math.log10(v) if log else v for _, v in points]
    low, high = min(values), max(values)
    first, last = min(steps), max(steps)
    span_v, span_s = (high - low) or 1.0, (last - first) or 1.0

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - first) / span_s * (right - left), bottom - (value - low) / span_v * (bottom - top))

    line = [xy(s, v) for s, v in zip(steps, values)]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    for point in line if len(line) <= 50 else line[-1:]:
        draw.ellipse((point[0] - 2, point[1] - 2, point[0] + 2, point[1] + 2), fill=(31, 119, 180))
    label = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3g}")
    draw.text((4, top), label(high), fill="black")
    draw.text((4, bottom - 10), label(low), fill="black")
    draw.text((left, bottom + 6), f"step {first:g}", fill="black")
    draw.text((right - 80, bottom + 6), f"step {last:g}", fill="black")
    return image


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """``RUN/curves.png`` (or ``out``): a panel for each series the run has logged."""
    records = read_metrics(run)
    panels = [draw_panel(points, title, log) for key, title, log in PANELS
              if (points := series(records, key, log))]
    if not panels:
        raise DifflabError(f"plot: {Path(run) / 'metrics.jsonl'} holds no loss, learning rate or throughput")
    sheet = Image.new("RGB", (WIDTH, HEIGHT * len(panels)), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (0, i * HEIGHT))
    out = Path(out) if out is not None else Path(run) / "curves.png"
    return atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
