"""The page as a person uses it: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium; no browser download) uploads photos through the real file input, edits the prepared set
(the odd photo flagged and removed, one photo cropped again by a click on it), starts a short training
on tiny-sd15, watches the loss plot gain points, generates, and saves a screenshot of every tab.

Screenshots go to $SCREENSHOT_DIR (default: the test's temporary folder) so a person can look at them.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from app_helpers import launch_app
from photo_sets import write_dog_set
from PIL import Image, ImageFilter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()) and not os.environ.get("REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(fn, timeout=120.0, what="condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the DOM changes under us while Gradio renders
            last = e
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def shots_dir(tmp_path: Path) -> Path:
    shots = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def screenshot(driver, path: Path) -> None:
    """The whole page at 1400 px and at a phone's 420 px (`<name>-420.png`): the window grows to
    the page's height for each shot."""
    for width, out in ((420, path.with_name(f"{path.stem}-420.png")), (1400, path)):
        driver.set_window_size(width, 1100)
        time.sleep(0.5)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(max(height, 1100), 4000))
        time.sleep(0.5)
        driver.save_screenshot(str(out))
    driver.set_window_size(1400, 1100)


def plot_points(driver, elem_id: str = "loss-plot") -> int:
    """Points on the longest line of a plot (Vega draws a line as one SVG path: M, then L per point)."""
    from selenium.webdriver.common.by import By

    paths = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} g.mark-line path")
    return max((p.get_attribute("d").count("L") + 1 for p in paths if p.get_attribute("d")), default=0)


def legend_inside(driver, elem_id: str) -> list[str]:
    """The legend's labels of a plot, asserting each lies inside the plot's box (not cut off)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, elem_id).rect
    labels = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} .role-legend-label text")
    for label in labels:
        r = label.rect
        assert box["y"] <= r["y"] and r["y"] + r["height"] <= box["y"] + box["height"], (label.text, r, box)
    return [label.text for label in labels]


# The caption table's cells as a person sees them: text cut off (clipped or "…"), rows drawn over
# each other, or an element scrolling inside the table (rows hidden in its own scroll).
CELLS_JS = """
const t = document.getElementById('captions');
const cells = [...t.querySelectorAll('[role=gridcell]')];
const box = t.getBoundingClientRect();
const cut = cells.filter(c => { const s = c.querySelector('span') || c;
  return s.scrollWidth > s.clientWidth + 1 || s.scrollHeight > c.clientHeight + 1
    || c.getBoundingClientRect().right > box.right + 1; });
const rows = [...t.querySelectorAll('[role=row].virtual-row')].map(r => r.getBoundingClientRect());
let overlap = 0;
for (let i = 1; i < rows.length; i++) if (rows[i].top < rows[i - 1].bottom - 1) overlap++;
const scrolls = v => ['auto', 'scroll'].includes(v);
const inner = [...t.querySelectorAll('*')].filter(e =>
  e.scrollHeight > e.clientHeight + 2 && scrolls(getComputedStyle(e).overflowY)
  || e.scrollWidth > e.clientWidth + 2 && scrolls(getComputedStyle(e).overflowX));
return {cut: cut.map(c => c.innerText.slice(0, 40)), overlap, inner: inner.length,
  names: cells.filter(c => c.dataset.col === '0').map(c => c.innerText),
  warnings: cells.filter(c => c.dataset.col === '2').map(c => c.innerText)};
"""


# The lowest contrast of the help text under labels, against the background it is drawn on.
CONTRAST_JS = """
const rgb = c => c.match(/[\\d.]+/g).map(Number);
const lum = c => { const v = rgb(c).slice(0, 3).map(x => { x /= 255;
  return x <= 0.03928 ? x / 12.92 : ((x + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
const bg = e => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
  const a = rgb(c); if (a.length < 4 || a[3] > 0.5) return c; } return 'rgb(255, 255, 255)'; };
return Math.min(...[...document.querySelectorAll('[data-testid=block-info]')].map(e => {
  const a = lum(getComputedStyle(e).color), b = lum(bg(e));
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }));
"""


def check_the_page_fits_a_phone(driver) -> None:
    """Item 11: at 420 px all five tabs show (none behind a "More tabs" menu) and the base-model
    row stacks; help text reaches 4.5:1 contrast (WCAG AA)."""
    from selenium.webdriver.common.by import By

    wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")) == 5, 60, "tabs")
    assert driver.execute_script(CONTRAST_JS) >= 4.5, driver.execute_script(CONTRAST_JS)
    driver.set_window_size(420, 1100)
    try:

        def tabs_shown():
            tabs = [t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.is_displayed()]
            width = driver.execute_script("return document.documentElement.clientWidth")
            return len(tabs) == 5 and all(
                t.rect["x"] >= 0 and t.rect["x"] + t.rect["width"] <= width for t in tabs
            )

        wait_until(tabs_shown, 10, "five tabs at 420 px")
        more = driver.find_elements(By.CSS_SELECTOR, "button[aria-label='More tabs']")
        assert not [m for m in more if m.is_displayed()]
        picker = driver.find_element(By.CSS_SELECTOR, "#base-row input").rect
        note = driver.find_element(By.ID, "base-note").rect
        assert note["y"] >= picker["y"] + picker["height"], (picker, note)  # below it, not beside
    finally:
        driver.set_window_size(1400, 1100)


CARDS = "#gallery-cards button[data-adapter]"


def cards(driver) -> dict[str, dict]:
    """The Gallery's adapter cards as a person sees them: text, pressed or not, image drawn."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll(arguments[0])].map(c => [c.dataset.adapter,"
        " {text: c.innerText, pressed: c.getAttribute('aria-pressed') === 'true',"
        "  image: [...c.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 0)}]))",
        CARDS,
    )


def press_card(driver, name: str, *keys: str) -> None:
    """Click an adapter's card (or send it `keys`), again if the grid was redrawn under the pointer."""
    from selenium.webdriver.common.by import By

    def press():
        card = driver.find_element(By.CSS_SELECTOR, f"{CARDS}[data-adapter='{name}']")
        if keys:
            card.send_keys(*keys)
        else:
            card.click()
        return True

    wait_until(press, 60, f"the card of {name}")


def pick_option(driver, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown: open it, then click the option in its list."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    wait_until(
        lambda: [
            o
            for o in driver.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
            if o.text.strip() == option
        ],
        30,
        f"option {option}",
    )[0].click()


def click_tab(driver, label: str) -> None:
    """Open a tab (once the page's first load no longer covers the tab bar with its spinner)."""
    from selenium.webdriver.common.by import By

    def click():
        for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
            if tab.text.strip().endswith(label):
                tab.click()  # raises while something is drawn over it: tried again
                return True
        raise AssertionError(f"no tab {label}")

    wait_until(click, 60, f"the {label} tab")


def test_photos_train_generate_gallery_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = shots_dir(tmp_path)
    demo, url, studio = launch_app(tmp_path / "data", "tiny-sd15")
    try:
        d = browser
        d.get(url)
        check_the_page_fits_a_phone(d)
        # Offline, a Hub model not downloaded: the hint names the command the pinned hub installs.
        # (After the page's own note for the default model, which would otherwise land last.)
        wait_until(lambda: "tiny-sd15" in d.find_element(By.ID, "base-note").text, 60, "the load's note")
        box = d.find_element(By.CSS_SELECTOR, "#base-row input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("someone/not-downloaded", Keys.ENTER)
        wait_until(
            lambda: "hf download someone/not-downloaded" in d.find_element(By.ID, "base-note").text,
            60,
            "the offline hint",
        )
        d.get(url)  # back to the default base model, nothing else done yet
        upload = wait_until(
            lambda: d.find_element(By.CSS_SELECTOR, "#photo-upload input[type=file]"), 60, "upload"
        )
        # A pet set: five photos of a dog, one of them a blurred strip (two warnings, a sentence too
        # long for one line of its cell), and a coffee mug that does not belong (issue 15, item 4).
        photos = write_dog_set(tmp_path / "photos", 5, seed=6, with_mug=True)
        with Image.open(photos[4]) as im:
            im.crop((0, 172, 640, 308)).filter(ImageFilter.GaussianBlur(6)).save(photos[4])
        d.find_element(By.CSS_SELECTOR, "#subject-type input[value=pet]").click()
        wait_until(lambda: d.find_element(By.CSS_SELECTOR, "#class-noun textarea, #class-noun input")
                   .get_attribute("value") == "dog", 30, "the class noun follows")  # fmt: skip
        upload.send_keys("\n".join(str(p) for p in photos))
        wait_until(
            lambda: len(d.find_elements(By.CSS_SELECTOR, "#photo-upload tbody tr")) == 6, 60, "6 uploads"
        )
        d.find_element(By.ID, "prepare-btn").click()
        wait_until(lambda: "6 photos ready" in d.find_element(By.ID, "prep-summary").text, 120, "prepared")
        wait_until(
            lambda: len(d.find_elements(By.CSS_SELECTOR, "#prepared img")) >= 6, 120, "prepared images"
        )
        # Warnings readable (item 7): every row on the page, no cell cut to one line or hidden in the
        # table's own scroll, one number prefix on each prepared name. The mug is flagged (item 4).
        seen = d.execute_script(CELLS_JS)
        warned = [w for w in seen["warnings"] if w]
        assert warned[0] == (
            "very wide or tall (4.7:1); only a square part is used; blurry: 1% of the set's median "
            "sharpness; a sharper photo trains better"
        ), seen
        assert warned[1].startswith("unlike the rest of the set") and "remove it or replace it" in warned[1]
        assert len(warned) == 2 and seen["warnings"][5] == warned[1], seen
        assert seen["cut"] == [] and seen["overlap"] == 0 and seen["inner"] == 0, seen
        assert seen["names"] == [f"00{i + 1}-dog-0{i}.png" for i in range(5)] + ["006-mug.png"], seen
        # Gradio's footer "Runs" (its call history, shown once a call is saved) is not offered.
        assert "Runs" not in [a.text.strip() for a in d.find_elements(By.CSS_SELECTOR, "footer a")]

        def pick(n: int, name: str) -> None:
            d.find_elements(By.CSS_SELECTOR, "#prepared button img")[n].click()
            wait_until(lambda: name in d.find_element(By.ID, "picked-info").text, 60, f"{name} picked")

        def square_src() -> str:
            return d.find_element(By.CSS_SELECTOR, "#edit-crop img").get_attribute("src")

        pick(5, "006-mug.png")
        assert "unlike the rest of the set" in d.find_element(By.ID, "picked-info").text
        screenshot(d, shots / "1-photos.png")
        # Remove the mug: five photos, no outlier left; its square, caption and original are gone.
        d.find_element(By.ID, "remove-btn").click()
        wait_until(lambda: "5 photos ready" in d.find_element(By.ID, "prep-summary").text, 60, "removed")
        assert not [e for e in d.find_elements(By.ID, "photo-editor") if e.is_displayed()], "editor closed"
        folder = studio.datasets_dir / "sks-dog"
        assert not list(folder.rglob("006-mug*")), list(folder.rglob("006-mug*"))
        wait_until(
            lambda: len([w for w in d.execute_script(CELLS_JS)["warnings"] if w]) == 1, 30, "one warned"
        )
        # Re-crop: a click at a fifth of the original's width centres the crop there (moved to stay
        # inside the photo: against its left edge), and the new square shows at once.
        pick(1, "002-dog-01.png")
        before, src = studio.dataset_report("sks-dog")["accepted"][1]["crop_box"], square_src()
        assert before[0] > 40, before
        original = d.find_element(By.CSS_SELECTOR, "#edit-original img")
        ActionChains(d).move_to_element_with_offset(
            original, -original.rect["width"] * 0.3, 0
        ).click().perform()
        wait_until(lambda: studio.dataset_report("sks-dog")["accepted"][1]["crop_box"] == [0, 0, 480, 480], 60,
                   "the crop moved to the left edge")  # fmt: skip
        wait_until(lambda: square_src() != src, 60, "the new crop shown")
        screenshot(d, shots / "1b-photos-recrop.png")

        click_tab(d, "Train")
        # A "Quick try" first; the estimate follows the settings as they change (issue 15, item 5).
        wait_until(
            lambda: "Quick try preset for 5 pet photos" in d.find_element(By.ID, "plan").text, 60, "preset"
        )
        d.find_element(By.CSS_SELECTOR, "#advanced button").click()
        wait_until(lambda: d.find_element(By.CSS_SELECTOR, "#adv-steps input").is_displayed(), 60, "advanced")
        # Long enough to watch it, then Stop: what a person does when the samples look right.
        set_number(d, "adv-steps", 2000)
        wait_until(
            lambda: "2000 steps" in d.find_element(By.ID, "plan").text, 60, "the estimate following the steps"
        )
        assert "Estimate" in d.find_element(By.ID, "plan").text
        set_number(d, "adv-class-images", 2)
        # Scored validation rounds (issue 17): offline, "auto" says in one line why scores are off;
        # the tiny models score every 10th step, each round a checkpoint the best can be picked from.
        wait_until(lambda: "Scores are off" in d.find_element(By.ID, "eval-note").text, 60, "scores off")
        pick_option(d, "adv-eval-models", "tiny")
        wait_until(lambda: "tiny random models" in d.find_element(By.ID, "eval-note").text, 60, "scores on")
        set_number(d, "adv-validation-steps", 10)
        set_number(d, "adv-checkpointing-steps", 10)
        time.sleep(0.5)
        d.find_element(By.ID, "start-btn").click()
        wait_until(lambda: studio.training_status()["state"] == "running", 120, "job running")
        wait_until(lambda: "step" in d.find_element(By.ID, "status-line").text, 120, "status line")
        # The timer redraws the plot while the job runs: its lines gain points from one poll to a later one.
        first = wait_until(lambda: plot_points(d) >= 2 and plot_points(d), 240, "plot points")
        wait_until(lambda: plot_points(d) > first, 120, "the plot gaining points")
        # The scores plot beside the loss gains a point per scored round while the run goes on.
        wait_until(lambda: plot_points(d, "scores-plot") >= 2, 240, "two scored rounds plotted")
        assert len(d.find_elements(By.CSS_SELECTOR, "#scores-plot g.mark-line path")) == 4
        assert studio.training_status()["state"] == "running"
        d.find_element(By.ID, "stop-btn").click()
        wait_until(lambda: studio.training_status()["state"] in ("stopped", "failed"), 240, "job stopped")
        snap = studio.training_status()
        assert snap["state"] == "stopped", snap["message"]
        wait_until(lambda: "Stopped" in d.find_element(By.ID, "status-line").text, 120, "stopped shown")
        wait_until(
            lambda: len(d.find_elements(By.CSS_SELECTOR, "#samples img")) >= 2, 120, "validation images"
        )
        # Four lines (instance, prior, total, smoothed total), each with every logged step.
        wait_until(
            lambda: plot_points(d) == len(studio.training_status()["metrics"]), 120, "all points drawn"
        )
        assert len(d.find_elements(By.CSS_SELECTOR, "#loss-plot g.mark-line path")) == 4
        assert sorted(legend_inside(d, "loss-plot")) == [
            "instance loss",
            "prior loss",
            "total",
            "total (smoothed)",
        ]
        screenshot(d, shots / "2-train.png")
        # A bad value is named on its own box, and the last run's status, plot and images stay (item 8).
        set_number(d, "adv-steps", 0)
        d.find_element(By.ID, "start-btn").click()
        wait_until(
            lambda: "Steps must be at least 1" in d.find_element(By.ID, "adv-steps").text, 30, "named field"
        )
        assert "Stopped" in d.find_element(By.ID, "status-line").text
        assert len(d.find_elements(By.CSS_SELECTOR, "#loss-plot g.mark-line path")) == 4
        assert len(d.find_elements(By.CSS_SELECTOR, "#samples img")) >= 2
        assert studio.training_status()["state"] == "stopped"

        click_tab(d, "Generate")
        name = studio.training_status()["adapter_name"]
        wait_until(lambda: name in d.find_element(By.ID, "adapter-pick").text or
                   d.find_element(By.CSS_SELECTOR, "#adapter-pick input").get_attribute("value") == name, 120, "adapter offered")  # fmt: skip
        wait_until(
            lambda: "sks" in d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value"),
            30,
            "prompt",
        )
        d.find_element(By.ID, "generate-btn").click()
        wait_until(lambda: d.find_elements(By.CSS_SELECTOR, "#images img"), 120, "generated image")
        # A random seed each click, shown with the image, and a history of results (issue 15, item 6).
        d.find_element(By.ID, "generate-btn").click()
        wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "#history img")) >= 2, 120, "two in history")
        seeds = re.findall(r"seed (\d+)", d.find_element(By.ID, "history").text)
        assert len(set(seeds)) == 2, d.find_element(By.ID, "history").text
        screenshot(d, shots / "3-generate.png")

        click_tab(d, "Gallery")
        # The gallery is a grid of cards (issue 15, item 10): the new adapter's card, clicked, is the
        # selection the details, downloads and actions beside it are about.
        wait_until(
            lambda: cards(d)[name]["image"] and re.search(r"\d+ steps", cards(d)[name]["text"]), 120, "card"
        )
        press_card(d, name)
        wait_until(lambda: cards(d)[name]["pressed"], 60, "the card selected")
        wait_until(lambda: name in d.find_element(By.ID, "gallery-details").text, 120, "gallery details")
        wait_until(lambda: d.find_element(By.ID, "download-zip").is_displayed(), 60, "downloads")
        screenshot(d, shots / "4-gallery.png")
        # Delete, then Restore at once: an undo, with nothing else to pick first (issue 15, item 10).
        d.find_element(By.ID, "delete-btn").click()
        wait_until(lambda: name not in [a["name"] for a in studio.list_adapters()], 60, "deleted")
        wait_until(lambda: name not in cards(d), 60, "its card gone")
        d.find_element(By.ID, "restore-btn").click()
        wait_until(lambda: name in [a["name"] for a in studio.list_adapters()], 60, "restored")
        wait_until(lambda: name in cards(d) and cards(d)[name]["pressed"], 60, "its card back, selected")
        wait_until(lambda: name in d.find_element(By.ID, "gallery-details").text, 60, "restored shown")
        # A second run to overlay: the first one's folder again under another id (its data is real).
        run_id = studio.training_status()["run_id"]
        other = run_id + "-again"
        shutil.copytree(studio.runs_dir / run_id, studio.runs_dir / other)
        click_tab(d, "Runs")

        def tick(run):
            box = wait_until(
                lambda: [b for b in d.find_elements(By.CSS_SELECTOR, "#runs-compare label") if b.text == run],
                30,
                f"run {run}",
            )
            box[0].click()

        def lines():
            return len(d.find_elements(By.CSS_SELECTOR, "#runs-plot g.mark-line path"))

        tick(run_id)
        wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "#runs-images img")) >= 2, 120, "run samples")
        wait_until(lambda: lines() == 1, 120, "one line for one run")
        # N ticked runs: N lines and N legend entries, inside the plot's box (issue 15, items 1 and 3).
        tick(other)
        wait_until(
            lambda: lines() == 2 and len(legend_inside(d, "runs-plot")) == 2, 60, "two lines for two runs"
        )

        # Vega shortens long legend labels with "…": a shortened label names the run it starts.
        def legend_runs():
            labels = legend_inside(d, "runs-plot")
            whole = [t for t in labels if not t.endswith("…")]
            cut = [t[:-1] for t in labels if t.endswith("…")]
            return sorted(
                whole + [r for r in (run_id, other) if r not in whole and any(r.startswith(c) for c in cut)]
            )

        assert legend_runs() == sorted([run_id, other])
        tick(run_id)  # untick the first: the second's line stays
        wait_until(lambda: lines() == 1 and legend_runs() == [other], 60, "the other run's line")
        tick(run_id)
        wait_until(lambda: lines() == 2, 60, "two lines again")
        # Scores per step of the ticked runs, each run's best checkpoint marked with the rule's reason.
        best = studio.run_checkpoints(run_id)[1]
        assert best is not None
        wait_until(lambda: "★ best" in d.find_element(By.ID, "runs-scores").text, 60, "best marked")
        wait_until(
            lambda: f"best checkpoint step {best}" in d.find_element(By.ID, "runs-best").text,
            60,
            "best named",
        )
        screenshot(d, shots / "5-runs.png")
        # Export the picked run's best checkpoint: a new adapter, selected in the Gallery with its scores.
        picked = d.find_element(By.CSS_SELECTOR, "#export-step input").get_attribute("value")
        assert picked.endswith("★ best"), picked
        d.find_element(By.ID, "export-btn").click()
        step = picked.split()[0]
        exported = wait_until(
            lambda: [a["name"] for a in studio.list_adapters() if a["name"].endswith(f"-step{step}")],
            120,
            "export",
        )[0]
        click_tab(d, "Gallery")
        wait_until(
            lambda: exported in cards(d) and cards(d)[exported]["pressed"], 60, "exported card selected"
        )
        wait_until(lambda: exported in d.find_element(By.ID, "gallery-details").text, 60, "exported shown")
        wait_until(lambda: "scores: dino" in d.find_element(By.ID, "gallery-details").text, 60, "its scores")
        screenshot(d, shots / "6-gallery-scores.png")
        for shot in (
            "1-photos",
            "1b-photos-recrop",
            "2-train",
            "3-generate",
            "4-gallery",
            "5-runs",
            "6-gallery-scores",
        ):
            assert (shots / f"{shot}.png").stat().st_size > 10_000
    finally:
        studio.runner.stop()
        studio.runner.wait(60)
        demo.close()


# ---- The Gallery, Generate's progress and the phone layout, on an app with adapters already saved ----


@pytest.fixture(scope="module")
def gallery_app(tiny_model, tmp_path_factory):
    """The app with two real adapters in its gallery (written by save_adapter, no training run)."""
    from lora_fixtures import lora_adapter

    src = tmp_path_factory.mktemp("adapter-sources")
    demo, url, studio = launch_app(tmp_path_factory.mktemp("gallery-data"), "tiny-sd15")
    try:
        for seed, name, token, created in (
            (1, "sks-dog", "sks", "2026-01-01T10:00:00+0000"),
            (2, "zwx-cat", "zwx", "2026-02-01T10:00:00+0000"),
        ):
            folder = lora_adapter(tiny_model, src / name, seed, with_samples=True, created=created,
                                  token=token, instance_prompt=f"a photo of {token} pet", steps=40 * seed)  # fmt: skip
            studio.store.add(folder)
        yield url, studio
    finally:
        demo.close()


def test_the_gallery_is_a_grid_of_cards(browser, gallery_app, tmp_path):
    """Issue 15 item 10: each adapter is a card (sample image, name, trigger, base, steps, date);
    a click or the keyboard selects one; downloads are buttons (no "×"), and Undo follows Delete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, studio = gallery_app
    d = browser
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    d.get(url)
    wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "button[role=tab]")) == 5, 60, "tabs")
    click_tab(d, "Gallery")
    shown = wait_until(lambda: len(cards(d)) == 2 and cards(d), 60, "two adapter cards")
    for name, token, steps, day in (
        ("sks-dog", "sks", 40, "2026-01-01"),
        ("zwx-cat", "zwx", 80, "2026-02-01"),
    ):
        text = shown[name]["text"]
        assert name in text and token in text and f"{steps} steps" in text and day in text, text
        assert "tiny-sd15" in text or "tiny" in text.lower(), text  # the base model, by name
        assert shown[name]["image"], name
    # The newest is selected when the page opens.
    wait_until(lambda: [n for n, c in cards(d).items() if c["pressed"]] == ["zwx-cat"], 30, "newest pressed")
    wait_until(lambda: "zwx-cat" in d.find_element(By.ID, "gallery-details").text, 30, "details")
    press_card(d, "sks-dog")
    wait_until(lambda: "sks-dog" in d.find_element(By.ID, "gallery-details").text, 30, "clicked card shown")
    assert [n for n, c in cards(d).items() if c["pressed"]] == ["sks-dog"]
    # The keyboard: a card is a button, Enter selects it.
    press_card(d, "zwx-cat", Keys.ENTER)
    wait_until(lambda: "zwx-cat" in d.find_element(By.ID, "gallery-details").text, 30, "card chosen by key")
    wait_until(lambda: d.find_element(By.ID, "download-zip").is_displayed(), 60, "downloads")
    screenshot(d, shots_dir(tmp_path) / "gallery-cards.png")
    # Downloads are labelled buttons, nothing in the panel looks like a delete "×"; the zip arrives.
    labels = [
        b.text for b in d.find_elements(By.CSS_SELECTOR, "#gallery-downloads button") if b.is_displayed()
    ]
    assert len(labels) == 3 and all("Download" in t or "download" in t for t in labels), labels
    assert "×" not in d.find_element(By.ID, "gallery-downloads").text
    d.find_element(By.CSS_SELECTOR, "#download-zip button, button#download-zip").click()
    zipped = wait_until(lambda: list(tmp_path.glob("zwx-cat*.zip")), 60, "the zip downloaded")
    assert zipped[0].stat().st_size > 1000
    # Delete, then Undo at once: the card goes and comes back, selected.
    d.find_element(By.ID, "delete-btn").click()
    wait_until(lambda: list(cards(d)) == ["sks-dog"], 60, "the card gone")
    d.find_element(By.ID, "restore-btn").click()
    wait_until(lambda: sorted(cards(d)) == ["sks-dog", "zwx-cat"], 60, "the card back")
    wait_until(lambda: cards(d)["zwx-cat"]["pressed"], 30, "the restored card selected")
    assert "zwx-cat" in d.find_element(By.ID, "gallery-details").text


# Every text the progress display shows while a request runs (it may last only a moment).
WATCH_PROGRESS_JS = """
window.progressSeen = [];
new MutationObserver(() => document.querySelectorAll('.progress-level-inner, .progress-text').forEach(
  e => window.progressSeen.push(e.innerText))).observe(document.body,
  {subtree: true, childList: true, characterData: true});
"""


def test_generate_shows_step_progress(browser, gallery_app, tmp_path):
    """Issue 15 item 6: while images are sampled the page counts the sampler's steps."""
    from selenium.webdriver.common.by import By

    url, _ = gallery_app
    d = browser
    d.get(url)
    wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "button[role=tab]")) == 5, 60, "tabs")
    click_tab(d, "Generate")
    wait_until(lambda: "a photo of" in d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value"),
               60, "prompt")  # fmt: skip
    d.execute_script(WATCH_PROGRESS_JS)
    d.find_element(By.ID, "generate-btn").click()

    def counted():
        return any(re.search(r"\b\d+/25\b", t) for t in d.execute_script("return window.progressSeen"))

    wait_until(lambda: counted() or d.find_elements(By.CSS_SELECTOR, "#images img"), 300, "progress or image")
    d.save_screenshot(str(shots_dir(tmp_path) / "generate-sampling.png"))  # the bar, if still there
    wait_until(lambda: d.find_elements(By.CSS_SELECTOR, "#images img"), 300, "generated image")
    assert counted(), sorted(set(d.execute_script("return window.progressSeen")))[:20]


# Each box of a container: its width against the container's (1.0: a box on a line of its own).
WIDTHS_JS = """
const box = document.querySelector(arguments[0]).getBoundingClientRect();
return [...document.querySelectorAll(arguments[1])].filter(e => e.offsetParent !== null)
  .map(e => [e.id || e.innerText.split('\\n')[0].slice(0, 30), e.getBoundingClientRect().width / box.width]);
"""


def test_a_phone_stacks_the_settings_and_the_plots(browser, gallery_app, tmp_path):
    """At 420 px the Train tab's advanced settings take a line each (not three squeezed to a row with
    a scroll bar), and the Train and Runs plots stack instead of sharing the width."""
    from selenium.webdriver.common.by import By

    url, studio = gallery_app
    studio.prepare_example_photos()  # the advanced settings show once there is a photo set
    d = browser
    d.set_window_size(420, 1100)
    d.get(url)
    wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "button[role=tab]")) == 5, 60, "tabs")
    # The prepared squares' label (two lines at this width) sits above them, not over the first row.
    wait_until(lambda: d.find_element(By.ID, "example-btn").is_displayed(), 60, "the example button")
    d.find_element(By.ID, "example-btn").click()
    wait_until(lambda: d.find_elements(By.CSS_SELECTOR, "#prepared img"), 60, "the prepared squares")
    label = d.find_element(By.CSS_SELECTOR, "#prepared label[data-testid=block-label]").rect
    first = d.find_element(By.CSS_SELECTOR, "#prepared img").rect
    assert label["y"] + label["height"] <= first["y"] + 1, (label, first)
    click_tab(d, "Train")
    # The newest set is chosen on load, and planned as what it was prepared as (not the Photos tab's
    # default "person").
    wait_until(
        lambda: "Quick try preset for 5 object photos" in d.find_element(By.ID, "plan").text,
        60,
        "the set's plan",
    )
    wait_until(lambda: d.find_element(By.CSS_SELECTOR, "#advanced button"), 60, "advanced settings").click()
    wait_until(lambda: d.find_element(By.CSS_SELECTOR, "#adv-steps input").is_displayed(), 60, "advanced")
    time.sleep(0.5)
    narrow = {}
    settings = d.execute_script(WIDTHS_JS, "#advanced", "#advanced .block")
    narrow["settings"] = [name for name, share in settings if share < 0.85]
    plots = d.execute_script(WIDTHS_JS, "#status-line", "#loss-plot, #scores-plot, #samples")
    narrow["train plots"] = [name for name, share in plots if share < 0.85]
    screenshot(d, shots_dir(tmp_path) / "train-advanced.png")
    d.set_window_size(420, 1100)
    click_tab(d, "Runs")
    wait_until(lambda: d.find_element(By.ID, "runs-plot").is_displayed(), 60, "runs tab")
    time.sleep(0.5)
    plots = d.execute_script(WIDTHS_JS, "#runs-table", "#runs-plot, #runs-images")
    narrow["runs plots"] = [name for name, share in plots if share < 0.85]
    overflow = d.execute_script(
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth"
    )
    assert narrow == {"settings": [], "train plots": [], "runs plots": []} and not overflow, (
        narrow,
        overflow,
    )


@pytest.mark.slow
def test_the_first_try_learns_the_orange_circle(browser, tmp_path):
    """Issue 19, as a new user meets it: the example photos (one orange circle) in one click, the
    Quick try on tiny-shapes, then Generate shows orange circles for "a photo of sks circle" with the
    sampling tiny-shapes needs, and "Compare" shows the circle without the token in the world's colours."""
    import numpy as np
    from selenium.webdriver.common.by import By

    from trainer_core import tiny_shapes

    shots = shots_dir(tmp_path)
    demo, url, studio = launch_app(tmp_path / "data", "tiny-shapes")
    try:
        d = browser
        d.get(url)
        wait_until(lambda: "tiny-shapes" in d.find_element(By.ID, "base-note").text, 60, "the load's note")
        wait_until(lambda: d.find_element(By.ID, "example-btn").is_displayed(), 60, "the example button")
        d.find_element(By.ID, "example-btn").click()
        wait_until(lambda: "5 photos ready" in d.find_element(By.ID, "prep-summary").text, 120, "example set")
        noun = d.find_element(By.CSS_SELECTOR, "#class-noun input, #class-noun textarea")
        wait_until(lambda: noun.get_attribute("value") == "circle", 30, "the class noun follows the set")
        assert d.find_element(By.CSS_SELECTOR, "#subject-type input[value=object]").is_selected()
        screenshot(d, shots / "first-try-1-photos.png")

        click_tab(d, "Train")
        wait_until(
            lambda: "Quick try preset for 5 object photos" in d.find_element(By.ID, "plan").text, 60, "preset"
        )
        d.find_element(By.ID, "start-btn").click()
        wait_until(lambda: studio.training_status()["state"] == "running", 120, "job running")
        wait_until(lambda: studio.training_status()["state"] != "running", 600, "the run to end")
        snap = studio.training_status()
        assert snap["state"] == "finished", snap.get("message")
        assert snap["total_steps"] == 300
        wait_until(lambda: d.find_element(By.ID, "go-generate").is_displayed(), 120, "Open in Generate")
        screenshot(d, shots / "first-try-2-train.png")
        d.find_element(By.ID, "go-generate").click()

        name = snap["adapter_name"]
        wait_until(
            lambda: d.find_element(By.CSS_SELECTOR, "#adapter-pick input").get_attribute("value") == name,
            120,
            "the new adapter picked",
        )
        wait_until(
            lambda: (
                d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value")
                == tiny_shapes.SUBJECT_PROMPT
            ),
            30,
            "the prompt",
        )
        set_number(d, "seed", 1)  # a circle of the world at this seed is red, far from the orange
        d.find_element(By.ID, "compare-btn").click()
        wait_until(lambda: len(d.find_elements(By.CSS_SELECTOR, "#images img")) >= 2, 240, "the comparison")
        screenshot(d, shots / "first-try-3-generate.png")
        # compare-<time>-<n>-<i>.png: i 0 the grid, 1 with the token, 2 without it.
        made = sorted((studio.data_dir / "outputs").glob("compare-*.png"), key=lambda p: p.stem[-1])
        singles = [Image.open(p).convert("RGB") for p in made if p.stem[-1] in "12"]
        assert len(singles) == 2, made
        with_token, without_token = (
            tiny_shapes.colour_distance([im], tiny_shapes.SUBJECT_COLOUR) for im in singles
        )
        # The same seed: orange with the token, a colour of the world without it.
        assert with_token < 60 < without_token, (with_token, without_token)
        assert np.asarray(singles[0]).std() > 10
    finally:
        demo.close()
