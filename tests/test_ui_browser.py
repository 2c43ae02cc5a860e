"""The web app in a real browser: Debian's chromium, headless, driven by Playwright.

The server runs as a subprocess (``python -m framepack.ui``, through ``ui_slow_server.py``, which
holds every denoising call back so that no job ends between two looks of the page) on a free port
with a tiny random model at 64 px, so a 1.2-second video takes a few seconds on a CPU.
Screenshots go to a temporary directory; ``make screenshots`` sets
FRAMEPACK_SCREENSHOTS=docs/screenshots and FRAMEPACK_UI_TEST_MODEL=tiny (the demo model) to retake
the README's.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ui_slow_server import Server
from ui_tiny_model import write_image, write_tiny_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DEMO = Path(__file__).resolve().parents[1] / "src" / "framepack" / "assets" / "demo"
JOB_TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                               "(apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path | str:
    return os.environ.get("FRAMEPACK_UI_TEST_MODEL") or write_tiny_model(tmp_path_factory.mktemp("browser_model"))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("FRAMEPACK_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("browser_images")
    huge = root / "huge.png"
    Image.new("RGB", (7000, 6000), (10, 20, 30)).save(huge)  # 42 MP: over the 40 MP limit, small file
    fake = root / "notes.png"
    fake.write_text("this is not an image")
    (root / "private").mkdir()
    return {"start": write_image(root / "start.png", size=(96, 128)), "demo": DEMO / "start.png", "huge": huge,
            "fake": fake, "secret": write_image(root / "private" / "secret.png", seed=7)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("browser_server")
    running = Server(root / "outputs", model, root / "server.log").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@contextmanager
def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#fp-generate")
    try:
        yield page
    finally:
        context.close()


# ---- page actions ------------------------------------------------------------------------------------------------


def fill_form(page, image: Path | None, prompt: str, seconds: float, steps: int, seed: int | None = None) -> None:
    if image is not None:
        page.locator("#fp-start input[type=file]").set_input_files(str(image))
        page.wait_for_selector("#fp-start img")
    page.locator("#fp-prompt textarea").fill(prompt)
    number = page.locator("#fp-seconds input[type=number]")
    number.fill(str(seconds))
    number.press("Enter")
    if seed is not None:
        page.locator("#fp-seed input").fill(str(seed))
    if not page.locator("#fp-steps").is_visible():
        page.click("#fp-advanced")
    page.locator("#fp-steps input").fill(str(steps))
    page.locator("#fp-steps input").press("Tab")


def submit(page) -> int:
    """Press Generate; returns the job number from the inline message."""
    message = page.locator("#fp-message")
    before = re.findall(r"Job (\d+) submitted", message.inner_text())
    page.click("#fp-generate")
    deadline = time.monotonic() + 60
    while (found := re.findall(r"Job (\d+) submitted", message.inner_text())) in ([], before):
        assert time.monotonic() < deadline, f"no submission: {message.inner_text()!r}"
        time.sleep(0.1)
    return int(found[0])


def expect_message(page, text: str) -> None:
    """Press Generate and wait for an inline message containing ``text``."""
    page.click("#fp-generate")
    playwright_api.expect(page.locator("#fp-message")).to_contain_text(text, timeout=60_000)


def wait_status(page, job: int, status: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    playwright_api.expect(page.locator("#fp-job")).to_contain_text(f"Job {job} · {status}", timeout=timeout_s * 1000)


def progress(page) -> tuple[float, str]:
    bar = page.locator("#fp-progress progress")
    return float(bar.get_attribute("value") or 0), page.locator("#fp-progress").inner_text()


def video_duration(page, selector: str = "#fp-video video") -> float:
    """Wait until the browser has loaded the video's metadata; its duration in seconds."""
    page.wait_for_function(f"() => {{ const v = document.querySelector('{selector}');"
                           " return v && v.readyState >= 1 && v.duration > 0; }", timeout=60_000)
    return page.evaluate(f"() => document.querySelector('{selector}').duration")


# ---- tests -------------------------------------------------------------------------------------------------------


def test_generate_a_one_second_video(server, browser, images, screenshots):
    from framepack.components import resolve_model

    with open_page(browser, server.url) as page:
        # a fresh page offers the model's own CFG scale (an empty field would submit 0)
        page.click("#fp-advanced")
        assert float(page.locator("#fp-cfg input").input_value()) == resolve_model(str(server.model)).cfg(None)
        page.click("#fp-advanced")
        # the demo's own start image and caption (what the screenshots show with the demo model)
        fill_form(page, images["demo"], (DEMO / "prompt.txt").read_text().strip(), seconds=1.2, steps=12)
        job = submit(page)
        seen: list[tuple[float, str]] = []
        deadline = time.monotonic() + JOB_TIMEOUT_S
        shot = False
        while "done" not in page.locator("#fp-job").inner_text():
            assert time.monotonic() < deadline, "the job did not finish"
            value, label = progress(page)
            seen.append((value, label))
            if not shot and "step" in label and value >= 4 and page.locator("#fp-preview img").count() == 1:
                # the preview of the section being denoised is there while it is denoised
                page.screenshot(path=str(screenshots / "ui-generating.png"), full_page=True)
                shot = True
            time.sleep(0.1)
        values = sorted({v for v, label in seen if "section 1/1 · step" in label})
        assert len(values) >= 2, f"progress did not move: {seen[-10:]}"
        assert any("ETA" in label for _, label in seen)
        assert shot, "no preview (and no screenshot) while the section was denoised"
        assert video_duration(page) > 0
        # the job is over: the preview of a section being denoised is gone
        playwright_api.expect(page.locator("#fp-preview img")).to_have_count(0, timeout=10_000)
        assert f"Job {job} · done" in page.locator("#fp-job").inner_text()
        page.screenshot(path=str(screenshots / "ui-done.png"), full_page=True)
    assert server.jobs()[job]["status"] == "done"


def test_cancel_then_resume(server, browser, images):
    with open_page(browser, server.url) as page:
        fill_form(page, images["start"], "a red circle moves to the right", seconds=2.4, steps=10, seed=11)
        job = submit(page)
        playwright_api.expect(page.locator("#fp-progress")).to_contain_text("step", timeout=JOB_TIMEOUT_S * 1000)
        page.click("#fp-cancel")
        wait_status(page, job, "cancelled", timeout_s=60)
        assert "Resume" in page.locator("#fp-job").inner_text()
        assert server.jobs()[job]["status"] == "cancelled"
        page.click("#fp-resume")
        playwright_api.expect(page.locator("#fp-message")).to_contain_text("queued again")
        wait_status(page, job, "done")
        assert video_duration(page) > 0


def test_two_users_submit_and_both_finish_in_order(server, browser, images):
    with open_page(browser, server.url) as first, open_page(browser, server.url) as second:
        fill_form(first, images["start"], "a red circle moves to the right", seconds=1.2, steps=3, seed=1)
        fill_form(second, images["start"], "[0s-0.5s: a red circle] [0.5s-1s: it moves right]", seconds=1.2, steps=3,
                  seed=2)
        a = submit(first)
        b = submit(second)
        assert b > a
        wait_status(first, a, "done")
        wait_status(second, b, "done")
        assert video_duration(first) > 0 and video_duration(second) > 0
    jobs = server.jobs()
    assert jobs[a]["status"] == jobs[b]["status"] == "done"
    assert jobs[a]["updated"] <= jobs[b]["updated"]  # a finished first: the queue ran in order


def test_bad_input_gets_an_inline_message_and_the_server_goes_on(server, browser, images, screenshots):
    with open_page(browser, server.url) as page:
        fill_form(page, None, "a red circle", seconds=1.2, steps=2)  # no image: text-to-video, but no colours to match
        page.locator("#fp-color-match input[type=checkbox]").check()
        expect_message(page, "needs a start image")
        page.locator("#fp-color-match input[type=checkbox]").uncheck()
        page.locator("#fp-start input[type=file]").set_input_files(str(images["fake"]))
        expect_message(page, "not a readable image: notes.png")
        assert "/tmp" not in page.locator("#fp-message").inner_text()  # no server paths in messages
        page.click("#fp-start button[aria-label='Remove Image']")
        page.locator("#fp-start input[type=file]").set_input_files(str(images["huge"]))
        page.wait_for_selector("#fp-start img")
        expect_message(page, "the limit is 40 MP")
        page.click("#fp-start button[aria-label='Remove Image']")
        fill_form(page, images["start"], "[0s-1s: a red circle] and then", seconds=1.2, steps=2)
        expect_message(page, "malformed prompt timeline")
        fill_form(page, None, "a red circle", seconds=1.2, steps=100000)
        expect_message(page, "steps must be between 1 and 200")
        page.locator("#fp-cfg input").fill("-5")
        page.locator("#fp-steps input").fill("2")
        page.locator("#fp-steps input").press("Tab")
        expect_message(page, "cfg must be a finite number >= 0")
        page.screenshot(path=str(screenshots / "ui-bad-input.png"), full_page=True)
        page.locator("#fp-cfg input").fill("1")
        page.locator("#fp-cfg input").press("Tab")
        job = submit(page)  # still serving, and this page's session still works
        wait_status(page, job, "done")


def test_history_use_these_settings(server, browser, images, screenshots):
    done = [job for job, row in server.jobs().items() if row["status"] == "done"]
    assert done, "earlier tests left no finished job"
    with open_page(browser, server.url) as page:
        page.click("button[role=tab]:has-text('History')")
        playwright_api.expect(page.locator("#fp-history")).to_contain_text("done")
        page.locator("#fp-history-job input").fill(str(done[0]))
        page.click("#fp-history-show")
        assert video_duration(page, "#fp-history-video video") > 0
        page.click("#fp-use-settings")
        playwright_api.expect(page.locator("#fp-history-message")).to_contain_text(f"job {done[0]}")
        page.screenshot(path=str(screenshots / "ui-history.png"), full_page=True)
        page.click("button[role=tab]:has-text('Generate')")
        row = server.jobs()[done[0]]
        playwright_api.expect(page.locator("#fp-seed input")).to_have_value(str(row["seed"]))
        page.click("button[role=tab]:has-text('History')")
        page.locator("#fp-mp4 input[type=file]").set_input_files(row["out"])  # as if downloaded and uploaded
        page.click("#fp-use-mp4")
        playwright_api.expect(page.locator("#fp-history-message")).to_contain_text(Path(row["out"]).name)
        page.reload()
        page.click("button[role=tab]:has-text('History')")
        page.locator("#fp-mp4 input[type=file]").set_input_files(str(images["fake"]))  # not a video
        page.click("#fp-use-mp4")
        message = page.locator("#fp-history-message")
        playwright_api.expect(message).to_contain_text("⚠")
        assert "notes.png" in message.inner_text() and "/tmp" not in message.inner_text()


def test_api_from_gradio_client(server, images, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    with pytest.raises(Exception, match="malformed prompt timeline"):
        client.predict(image=handle_file(str(images["start"])), prompt="[0s-1s: x] y", api_name="/submit")
    job = client.predict(image=handle_file(str(images["start"])), prompt="a red circle", seconds=1.2, steps=2,
                         random_seed=True, api_name="/submit")
    assert job["status"] in ("queued", "running") and 0 <= job["seed"] < 2**32
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.predict(job=job["job"], api_name="/status"))["status"] != "done":
        assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.5)
    video = Path(client.predict(job=job["job"], api_name="/video"))
    assert video.is_file() and video.suffix == ".mp4"
    assert job["job"] in [j["job"] for j in client.predict(api_name="/history")]


def test_auth_login_is_required(tmp_path, model, browser, images):
    """--auth: the page asks for the login, a wrong password is refused, the API needs it too."""
    from gradio_client import Client

    server = Server(tmp_path / "outputs", model, tmp_path / "server.log", extra=("--auth", "me:secret")).start()
    try:
        with pytest.raises(Exception):
            Client(server.url, verbose=False)  # no login, no API
        client = Client(server.url, auth=("me", "secret"), verbose=False)
        assert client.predict(api_name="/history") == []
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url)
        for password in ("wrong", "secret"):
            page.locator("input[type=password]").wait_for()
            page.locator("input[type=text]").first.fill("me")
            page.locator("input[type=password]").fill(password)
            page.locator("input[type=password]").press("Enter")
            if password == "wrong":
                playwright_api.expect(page.locator("body")).to_contain_text("Incorrect", timeout=30_000)
                assert page.locator("#fp-generate").count() == 0
        page.wait_for_selector("#fp-generate")
        context.close()
    finally:
        server.stop()


def test_a_server_path_in_place_of_an_upload_is_refused(server, browser, images):
    """The page's own request, rewritten on its way out: the image becomes a path on the server
    (a plain string, then a {"path": ...} object) instead of the upload. One message, the same for a
    file that exists and one that does not, no path in it, and no job."""
    before = set(server.jobs())
    secret = images["secret"]
    messages = []
    with open_page(browser, server.url) as page:
        fill_form(page, images["start"], "a red circle", seconds=1.2, steps=1)
        for swap in (str(secret), {"path": str(secret)}, str(secret.with_name("nope.png")),
                     {"path": str(secret.with_name("nope.png"))}):
            def rewrite(route, request, swap=swap):
                body = json.loads(request.post_data or "{}")
                data = body.get("data") or []
                # the form's first value is the start image
                if data and isinstance(data[0], dict) and "path" in data[0]:
                    data[0] = swap
                route.continue_(post_data=json.dumps(body))

            page.route("**/gradio_api/queue/join*", rewrite)
            expect_message(page, "not a file uploaded to this server")
            text = page.locator("#fp-message").inner_text()
            text = text[text.index("⚠"):].strip()  # the message, without the progress timer beside it
            assert str(secret.parent) not in text and "secret" not in text and "nope" not in text
            messages.append(text)
            page.unroute("**/gradio_api/queue/join*")
            # another message in between (the page shows a message again only when it changes)
            page.locator("#fp-prompt textarea").fill("")
            expect_message(page, "type a prompt")
            page.locator("#fp-prompt textarea").fill("a red circle")
    assert len(set(messages)) == 1  # the same message whether the file exists or not
    assert set(server.jobs()) == before


def test_page_state_follows_the_model_the_length_and_the_job(server, browser, images):
    """Point 16 and the length control: the fields the model ignores are hidden, CFG follows the model,
    the length moves in sections and shows the real length, History's job field starts empty, the
    tables fit at 1400 px, and after a cancel nothing of the previous job or of the running state stays."""
    from framepack.planning import real_seconds

    from framepack.ui.app import model_cfg, model_steps, uses_distilled_guidance

    with open_page(browser, server.url) as page:
        # the length control: steps of one section, and the length the video really has
        step = float(page.locator("#fp-seconds input[type=range]").get_attribute("step"))
        assert step == pytest.approx(1.2)
        number = page.locator("#fp-seconds input[type=number]")
        number.fill("5")
        number.press("Enter")
        playwright_api.expect(page.locator("#fp-length")).to_contain_text(f"{real_seconds(5):.2f} s")
        # fields of the chosen model
        page.click("#fp-advanced")
        model = str(server.model)
        assert page.locator("#fp-guidance").is_visible() == uses_distilled_guidance(model)
        assert float(page.locator("#fp-cfg input").input_value()) == model_cfg(model)
        if model != "tiny":  # the demo models are offered too: choosing one brings its own CFG and steps
            page.locator("#fp-model input").click()
            page.get_by_role("option", name="tiny", exact=True).click()
            playwright_api.expect(page.locator("#fp-cfg input")).to_have_value(f"{model_cfg('tiny'):g}")
            assert page.locator("#fp-guidance").is_visible() == uses_distilled_guidance("tiny")
            # the few-step student brings its own steps and CFG, and the teacher its own back
            for name in ("tiny-fast", "tiny"):
                page.locator("#fp-model input").click()
                page.get_by_role("option", name=name, exact=True).click()
                playwright_api.expect(page.locator("#fp-steps input")).to_have_value(f"{model_steps(name)}")
                playwright_api.expect(page.locator("#fp-cfg input")).to_have_value(f"{model_cfg(name):g}")
            assert model_steps("tiny-fast") < model_steps("tiny")
            page.locator("#fp-model input").click()
            page.get_by_role("option", name=Path(model).name).click()
            playwright_api.expect(page.locator("#fp-cfg input")).to_have_value(f"{model_cfg(model):g}")
        page.click("#fp-advanced")

        # a finished job, then a cancelled one: the first one's video must not stay under the second
        fill_form(page, images["start"], "a red circle", seconds=1.2, steps=2, seed=3)
        first = submit(page)
        wait_status(page, first, "done")
        assert video_duration(page) > 0
        fill_form(page, None, "a red circle moves to the right", seconds=2.4, steps=12, seed=4)
        second = submit(page)
        playwright_api.expect(page.locator("#fp-progress")).to_contain_text("step", timeout=JOB_TIMEOUT_S * 1000)
        page.click("#fp-cancel")
        wait_status(page, second, "cancelled", timeout_s=60)
        playwright_api.expect(page.locator("#fp-message")).not_to_contain_text("cancelling", timeout=10_000)
        playwright_api.expect(page.locator("#fp-video video")).to_have_count(0, timeout=10_000)
        playwright_api.expect(page.locator("#fp-preview img")).to_have_count(0, timeout=10_000)
        labels = page.locator("#fp-preview").inner_text() + page.locator("#fp-video").inner_text()
        assert "being denoised" not in labels and "provisional" not in labels

        # History: the job field starts empty; the tables keep every column on screen at 1400 px
        page.click("button[role=tab]:has-text('History')")
        assert page.locator("#fp-history-job input").input_value() == ""
        page.click("#fp-history-show")
        playwright_api.expect(page.locator("#fp-history-message")).to_contain_text("no job selected")
        playwright_api.expect(page.locator("#fp-history")).to_contain_text("cancelled")
        for table in ("#fp-history", "#fp-queue"):
            if table == "#fp-queue":
                page.click("button[role=tab]:has-text('Generate')")
            overflow = page.evaluate(f"""() => {{
                const root = document.querySelector('{table}');
                const right = root.getBoundingClientRect().right;
                return [...root.querySelectorAll('th')].filter(th => th.getBoundingClientRect().right > right + 1)
                    .map(th => th.innerText); }}""")
            assert overflow == [], f"{table}: columns off screen: {overflow}"
    log = server.log.read_text()
    assert f"job {first} started" in log and f"job {first} done" in log and f"job {second} cancelled" in log


def test_killed_server_finishes_the_job_after_a_restart(server, browser, images):
    """Last in this file: it kills the shared server and leaves a restarted one behind."""
    with open_page(browser, server.url) as page:
        fill_form(page, images["start"], "a red circle moves to the right", seconds=2.4, steps=20, seed=5)
        job = submit(page)
        # section 2 of 2 has begun: section 1 is on disk
        playwright_api.expect(page.locator("#fp-progress")).to_contain_text("section 2/2",
                                                                           timeout=JOB_TIMEOUT_S * 1000)
        server.kill()
    assert server.jobs()[job]["status"] == "running"  # as the crash left it

    server.restart()
    with open_page(browser, server.url) as page:  # a fresh page follows the running job
        wait_status(page, job, "done")
        assert video_duration(page) > 0
    assert server.jobs()[job]["status"] == "done"
    assert f"continuing interrupted job(s) [{job}]" in server.log.read_text()
