"""`copylora gui` in a real browser: headless Chromium from the OS packages, driven by Selenium.

The page is served by the real command (`python -m copylora.gui`) on a free port. Without Chromium,
chromedriver, selenium or gradio these tests skip with the reason; COPYLORA_REQUIRE_BROWSER=1
(.ci/run sets it) makes that a failure. COPYLORA_SCREENSHOTS=DIR saves each tab's picture there
(the README's pictures in docs/ come from such a run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from copylora.webui.settings import Settings, save
from tests.kohya_tool_fakes import add_tools
from tests.test_gui import assert_same_as_cli_merge, free_port, lora_pair
from tests.test_train_fakes import PYTHON, FakeKohya, read_log

REQUIRE_BROWSER = "COPYLORA_REQUIRE_BROWSER"
SCREENSHOTS = "COPYLORA_SCREENSHOTS"
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome")
WAIT = 60  # seconds for anything the page does (2 shared CPU cores in CI)


def missing(reason: str) -> None:
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{reason}; {REQUIRE_BROWSER}=1 requires it", pytrace=False)
    pytest.skip(reason)


def gradio_installed() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing('needs the [gui] extra (pip install "copylora[gui]")')


def chromium() -> tuple[str, str]:
    """The system's Chromium and its chromedriver (Debian: apt-get install chromium chromium-driver)."""
    browser = next((path for path in map(shutil.which, CHROMIUMS) if path), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing("needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


class Server:
    """`python -m copylora.gui` on a free port, with its own settings folder and output folder."""

    def __init__(self, root: Path, language: str, env: dict[str, str] | None = None):
        self.root = root
        self.output_dir = root / "out"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        environment = {**os.environ, "XDG_CONFIG_HOME": str(root / "config"), **(env or {})}
        self.log = open(root / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "copylora.gui", "--port", str(self.port), "--lang", language,
             "--output-dir", str(self.output_dir)],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + WAIT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"copylora gui exited {self.process.returncode}: {self.output()}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"copylora gui did not answer in {WAIT} s: {self.output()}") from None
                time.sleep(0.3)

    def output(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


class Browser:
    """A headless Chromium page with the waits these tests need."""

    def __init__(self, url: str, language: str = "en-US"):
        gradio_installed()
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            missing("needs selenium (pip install selenium)")
        binary, driver = chromium()
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1200",
                         f"--lang={language}"):
            options.add_argument(argument)
        # Gradio's own words (upload hints) follow the browser's language
        options.add_experimental_option("prefs", {"intl.accept_languages": language})
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.get(url)
        self.wait_for(lambda: self.driver.find_elements("css selector", "button[role=tab]"))

    def wait_for(self, condition, timeout: float = WAIT):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(lambda _: condition())

    def css(self, selector: str):
        return self.driver.find_element("css selector", selector)

    def open_tab(self, label: str) -> None:
        tab = next(b for b in self.driver.find_elements("css selector", "button[role=tab]") if b.text == label)
        tab.click()
        self.wait_for(lambda: tab.get_attribute("aria-selected") == "true")

    def upload(self, elem_id: str, files: list[Path]) -> None:
        self.css(f"#{elem_id} input[type=file]").send_keys("\n".join(str(f) for f in files))
        self.wait_for(lambda: all(f.stem in self.css(f"#{elem_id}").text for f in files))  # the page splits off the suffix

    def type_into(self, elem_id: str, text: str) -> None:
        field = self.css(f"#{elem_id} textarea, #{elem_id} input")
        field.clear()
        field.send_keys(text)

    def value(self, elem_id: str) -> str:
        return self.css(f"#{elem_id} textarea, #{elem_id} input").get_attribute("value") or ""

    def body_text(self) -> str:
        return self.css("body").text

    def screenshot(self, name: str) -> None:
        folder = os.environ.get(SCREENSHOTS)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1280, height)  # the whole page, not the first screenful
            self.driver.save_screenshot(str(Path(folder) / name))
            self.driver.set_window_size(1280, 1200)

    def quit(self) -> None:
        self.driver.quit()


# kohya's progress bar, from the stand-in training script: 30 steps, half a second each for LoRA B
# while the flag file exists (so that Stop finds it running); its pid goes to FAKE_PID_DIR
SLOW_TRAINING = """
    import os as _os, sys as _sys, time as _time
    open(_os.path.join(_os.environ["FAKE_PID_DIR"], str(_os.getpid())), "w").close()
    _slow = _os.path.exists(_os.environ["FAKE_SLOW_FLAG"]) and any(a.endswith("B.toml") for a in _sys.argv)
    for _step in range(1, 31):
        _sys.stderr.write(f"\\rsteps: {_step * 10 // 3:3d}%|#| {_step}/30 [00:{_step:02d}<00:{30 - _step:02d}, 2.00it/s]")
        _sys.stderr.flush()
        _time.sleep(0.5 if _slow else 0)
    _sys.stderr.write("\\n")
"""


class Kohya(FakeKohya):
    """The stand-in checkout with a training script that shows kohya's step counter and can be slow."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(root, monkeypatch)
        add_tools(self.sd_scripts)  # stand-in gen_img.py for the Preview tab
        script = self.sd_scripts / "train_network.py"
        main = 'if __name__ == "__main__":\n'
        script.write_text(script.read_text().replace(main, main + SLOW_TRAINING.lstrip("\n"), 1))
        self.pids = root / "pids"
        self.pids.mkdir()
        self.slow_flag = root / "slow"
        monkeypatch.setenv("FAKE_PID_DIR", str(self.pids))
        monkeypatch.setenv("FAKE_SLOW_FLAG", str(self.slow_flag))
        self.before, self.after = root / "before.png", root / "after.png"
        Image.new("RGB", (24, 36), (200, 30, 30)).save(self.before)
        Image.new("RGB", (24, 36), (90, 90, 90)).save(self.after)

    def trained(self) -> list[str]:
        return [run["config"]["output_name"] for run in read_log(self.log) if "config" in run]  # not gen_img's


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The English page, its settings pointing at a stand-in kohya checkout."""
    gradio_installed()
    chromium()
    root = tmp_path_factory.mktemp("gui_en")
    with pytest.MonkeyPatch.context() as patch:
        kohya = Kohya(root, patch)
        patch.setenv("XDG_CONFIG_HOME", str(root / "config"))
        save(Settings(sd_scripts=str(kohya.sd_scripts), python=PYTHON))
        server = Server(root, "en")
        server.kohya = kohya
        yield server
        server.stop()


@pytest.fixture
def browser(server):
    page = Browser(server.url)
    yield page
    page.quit()


def test_merge_tab_writes_the_clis_file(server, browser, tmp_path):
    b, a = lora_pair(tmp_path / "inputs")
    browser.open_tab("Difference / merge")
    browser.upload("merge-models", [b, a])
    browser.type_into("merge-ratios", "1 -1")
    browser.wait_for(lambda: len(browser.driver.find_elements("css selector", ".merge-ratio")) == 2)
    labels = [slider.text.splitlines()[0] for slider in browser.driver.find_elements("css selector", ".merge-ratio")]
    assert labels == ["1: B.safetensors", "2: A.safetensors"]  # one slider per file, in order
    browser.type_into("merge-save-to", "browser_diff.safetensors")
    browser.css("#merge-run").click()
    browser.wait_for(lambda: browser.value("merge-summary").startswith("merged "))
    browser.wait_for(lambda: browser.css("#merge-spectrum img").is_displayed())
    assert browser.value("merge-fidelity").startswith("fidelity vs exact delta: retained ")
    browser.screenshot("gui_merge.png")

    saved = server.output_dir / "browser_diff.safetensors"
    assert_same_as_cli_merge(saved, [b, a], tmp_path / "cli_diff.safetensors")


def test_bad_input_shows_the_one_line_message(server, browser, tmp_path):
    b, a = lora_pair(tmp_path / "inputs")
    browser.open_tab("Difference / merge")
    browser.upload("merge-models", [b, a])
    browser.type_into("merge-ratios", "1")
    browser.type_into("merge-save-to", "never.safetensors")
    browser.css("#merge-run").click()
    line = "copylora.merge: error: --ratios: 1 values for 2 models; give one ratio per model"
    browser.wait_for(lambda: line in browser.body_text())
    assert "Traceback" not in browser.body_text()
    assert not (server.output_dir / "never.safetensors").exists()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_copy_machine_progress_stop_and_resume(server, browser):
    kohya = server.kohya
    browser.open_tab("Copy machine")
    browser.type_into("cm-base", str(kohya.base))
    browser.upload("cm-before", [kohya.before])
    browser.upload("cm-after", [kohya.after])
    kohya.slow_flag.touch()
    browser.css("#cm-run").click()

    def counter() -> int:
        text = browser.css("#cm-status").text
        return int(text.split("kohya: ", 1)[1].split("/", 1)[0]) if "step: train B" in text and "kohya: " in text else 0

    first = browser.wait_for(counter)
    browser.wait_for(lambda: counter() > first)  # kohya's own counter advances in the page
    assert "elapsed: " in browser.css("#cm-status").text and "/30 [" in browser.value("cm-log")
    browser.screenshot("gui_copy_machine_progress.png")
    pids = [int(p.name) for p in kohya.pids.iterdir()]
    browser.css("#cm-stop").click()
    browser.wait_for(lambda: "stopped: press Run to resume" in browser.css("#cm-status").text)
    assert pids and not any(alive(pid) for pid in pids)  # kohya's whole process tree is gone
    work = server.output_dir / "edit_work"
    assert (work / "A.safetensors").is_file() and not (work / "B.safetensors").exists()

    kohya.slow_flag.unlink()
    browser.css("#cm-preview input").click()  # and a preview grid at the end (stand-in gen_img)
    browser.type_into("cm-preview-args", "--seeds 1 2 --width 32 --height 32")
    browser.css("#cm-run").click()
    browser.wait_for(lambda: "finished" in browser.css("#cm-status").text)
    assert kohya.trained() == ["A", "B"]  # A once (reused on the second Run), B once (the first was stopped)
    browser.wait_for(lambda: browser.css("#cm-picture img").is_displayed())
    assert "grid.png" in browser.css("#cm-picture img").get_attribute("src")  # the preview grid
    assert "fidelity vs exact delta: retained" in browser.css("#cm-fidelity").text
    report = browser.css("#cm-report").text
    assert "merge B - A" in report and "reused (trained " in report and "kohya's gen_img" in report
    assert browser.css("#cm-report img").get_attribute("naturalWidth") != "0"  # the report's picture, served
    assert "edit\n.safetensors" in browser.css("#cm-download").text  # the page splits off the suffix
    assert (server.output_dir / "edit.safetensors").is_file()
    browser.screenshot("gui_copy_machine.png")


def test_resize_inspect_preview_and_settings_tabs(server, browser, tmp_path):
    b, _ = lora_pair(tmp_path / "inputs")
    browser.open_tab("Resize")
    browser.upload("resize-model", [b])
    browser.css("#resize-run").click()
    browser.wait_for(lambda: "resized.safetensors" in browser.value("resize-summary"))
    browser.screenshot("gui_resize.png")

    browser.open_tab("Inspect")
    browser.upload("inspect-lora", [server.output_dir / "resized.safetensors"])
    browser.upload("inspect-against", [b])
    browser.type_into("inspect-ratios", "1")
    browser.css("#inspect-run").click()
    browser.wait_for(lambda: browser.value("inspect-totals").startswith("fidelity vs exact delta: retained "))
    browser.wait_for(lambda: browser.css("#inspect-spectrum img").is_displayed())
    browser.screenshot("gui_inspect.png")

    browser.open_tab("Preview")
    browser.type_into("preview-base", str(server.kohya.base))
    browser.upload("preview-loras", [b])
    browser.type_into("preview-width", "64")
    browser.type_into("preview-height", "64")
    browser.css("#preview-run").click()
    browser.wait_for(lambda: browser.css("#preview-grid img").is_displayed())
    assert str(server.output_dir / "B_preview") in browser.value("preview-summary")
    browser.screenshot("gui_preview.png")

    browser.open_tab("Settings")
    assert f"sd-scripts: {server.kohya.sd_scripts}" in browser.value("settings-kohya")
    assert "--backend auto on cpu:" in browser.css("#settings-doctor").text  # doctor's report
    browser.screenshot("gui_settings.png")


def test_the_japanese_page(tmp_path):
    gradio_installed()
    chromium()
    server = Server(tmp_path, "ja")
    try:
        page = Browser(server.url, "ja")
        try:
            tabs = [b.text for b in page.driver.find_elements("css selector", "button[role=tab]")]
            assert tabs[:3] == ["コピー機", "差分 / マージ", "リサイズ"]
            assert "変更前の画像 (before)" in page.body_text() and "実行" in page.body_text()
            page.screenshot("gui_ja.png")
        finally:
            page.quit()
    finally:
        server.stop()
