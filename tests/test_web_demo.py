"""``difflab demo``: the web demo's API gives ``difflab sample``'s grid for the same options and answers bad
input with 400 naming the field; the page, driven in headless Chromium, shows that grid; the command's errors."""

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from difflab.cli import main
from difflab.pipelines import web_demo
from difflab.pipelines.web_demo import demo_server
import test_sample_cli

# fixtures: a tiny class-conditional Fashion-MNIST run (two training steps) on a stand-in data set
conditional_run, fake_fashion_mnist = test_sample_cli.conditional_run, test_sample_cli.fake_fashion_mnist

TILE = 28 + 2                            # a Fashion-MNIST image and the grid's padding


@pytest.fixture
def server(conditional_run):
    server = demo_server([conditional_run], port=0, device="cpu")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "api/sample", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        assert "\n" not in text.strip() and "Traceback" not in text      # one line, never a traceback
        return error.code, json.loads(text)


def decoded(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):]))))


def cli_grid(run, out, *options: str) -> np.ndarray:
    assert main(["sample", str(run), "--out", str(out), *options]) == 0
    return np.asarray(Image.open(out / "samples.png"))


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_api_gives_the_cli_grid_and_names_the_field_of_bad_input(server, conditional_run, tmp_path):
    with urllib.request.urlopen(server.url + "api/models", timeout=10) as reply:
        models = json.loads(reply.read())
    [run] = models["runs"]
    assert run["name"] == str(conditional_run) and run["conditional"] and run["classes"][7] == "Sneaker"
    assert "heun" in models["samplers"] and "ancestral" in models["samplers"]

    status, result = post(server.url, {"run": run["name"], "sampler": "euler", "steps": 3, "seed": 5, "n": 4,
                                       "class": "Sneaker", "guidance": 1.0})
    assert status == 200 and result["seeds"] == [5, 6, 7, 8] and result["seconds"] >= 0
    grid = decoded(result["image"])
    assert grid.shape == (2 * TILE + 2, 2 * TILE + 2)                    # 2 x 2 grey tiles
    expected = cli_grid(conditional_run, tmp_path / "cli", "--n", "4", "--sampler", "euler", "--steps", "3",
                        "--seed", "5", "--class", "Sneaker", "--guidance", "1")
    assert same_pixels(grid, expected)
    _, unconditional = post(server.url, {"sampler": "ancestral", "steps": 2, "seed": 0, "n": 1})   # no class
    assert same_pixels(decoded(unconditional["image"]), cli_grid(conditional_run, tmp_path / "cli1", "--n", "1",
                                                                 "--sampler", "ancestral", "--steps", "2"))

    for body, field in [({"sampler": "nope"}, "sampler"), ({"steps": 0}, "steps"), ({"steps": "3"}, "steps"),
                        ({"class": "Hat"}, "class"), ({"class": 10}, "class"), ({"n": 65}, "n"),
                        ({"seed": -1}, "seed"), ({"guidance": -1}, "guidance"), ({"guidance": 2}, "guidance"),
                        ({"run": "elsewhere"}, "run"), ({"run": ["a"]}, "run"), ({"sampler": {}}, "sampler"),
                        ({"colour": 1}, "colour"), ([1, 2], "body"), (b"{not json", "body"), ({"prompt": "a bag"}, "prompt")]:
        status, answer = post(server.url, body)
        assert status == 400 and answer["field"] == field and answer["error"].startswith(field + ":"), (body, answer)


def test_page_in_headless_chromium_generates_the_api_grid(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        Select(driver.find_element(By.ID, "sampler")).select_by_value("dpmpp-2m")
        Select(driver.find_element(By.ID, "class")).select_by_visible_text("9: Ankle boot")
        for field, value in (("steps", "3"), ("seed", "11"), ("n", "6")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.execute_script(
            "const image = document.getElementById('grid'); return image.src.startsWith('data:image/png') && "
            "image.complete && image.naturalWidth > 0"))
        grid = decoded(driver.find_element(By.ID, "grid").get_attribute("src"))
        status = driver.find_element(By.ID, "status").text

        Select(driver.find_element(By.ID, "class")).select_by_value("")          # guidance without a class
        driver.find_element(By.ID, "guidance").clear()
        driver.find_element(By.ID, "guidance").send_keys("1")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("class") == "error")
        error = driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
    assert grid.shape == (2 * TILE + 2, 3 * TILE + 2)                    # 6 images: 3 columns, 2 rows
    tiles = grid[2:2 + 28, 2:2 + 28]
    assert tiles.std() > 0                                               # not blank
    assert "6 images" in status and "seeds 11-16" in status
    assert error.startswith("guidance:") and "class" in error
    _, result = post(server.url, {"sampler": "dpmpp-2m", "steps": 3, "seed": 11, "n": 6, "class": "9"})
    assert np.array_equal(grid, decoded(result["image"]))


def test_demo_command_prints_the_url_and_stops_on_ctrl_c(conditional_run, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(web_demo.DemoServer, "serve_forever", interrupted)
    assert main(["demo", str(conditional_run), "--port", "0", "--device", "cpu"]) == 0
    assert "http://127.0.0.1:" in capsys.readouterr().out


def test_demo_command_on_a_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "missing", tmp_path / "empty"):
        assert main(["demo", str(run), "--port", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("difflab: error:") and str(run) in err and "\n" not in err


def test_api_samples_a_text_to_image_run_from_a_prompt_as_the_cli_does(fake_fashion_mnist, tmp_path):  # noqa: F811
    from test_text_to_image import TINY

    run = tmp_path / "text"
    assert main(["train", "fmnist_text_glide", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", f"train.out_dir={run}", *TINY]) == 0
    server = demo_server([run], port=0, device="cpu")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(server.url + "api/models", timeout=10) as reply:
            [described] = json.loads(reply.read())["runs"]
        assert described["text"] and not described["conditional"]
        status, result = post(server.url, {"prompt": "a dark ankle boot", "guidance": 2, "steps": 2, "seed": 3, "n": 4})
        assert status == 200
        expected = cli_grid(run, tmp_path / "cli", "--n", "4", "--steps", "2", "--seed", "3", "--guidance", "2",
                            "--prompt", "a dark ankle boot")
        assert same_pixels(decoded(result["image"]), expected)
        for body, field in [({"prompt": 5}, "prompt"), ({"prompt": "x" * 301}, "prompt"), ({"guidance": 2}, "guidance"),
                            ({"class": "Bag"}, "class")]:
            status, answer = post(server.url, body)
            assert status == 400 and answer["field"] == field, (body, answer)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
