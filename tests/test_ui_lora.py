"""The web app's LoRA folder (framepack ui --lora-dir), over HTTP against a running server.

The page's Generate click hands its LoRA field over (on_loras) before the form (on_submit); an API
client calls /choose_loras before /submit in the same session (gradio_client's Client).

Only files directly in the folder are offered and read, by name; every other name a client can
send (``..``, absolute paths, subfolders, a symlink out of the folder, odd types) gets a one-line
message and makes no job. A chosen LoRA is kept with the queued job (its settings, by path and
sha256 on the server, by name in every reply) and recorded in the video.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_lora import demo_lora
from ui_slow_server import Server
from ui_tiny_model import write_image, write_tiny_model

pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")

JOB_TIMEOUT_S = 180
GENERIC = "upstream"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_lora")
    model = write_tiny_model(root / "model")
    folder = root / "loras"
    (folder / "sub").mkdir(parents=True)
    (root / "outside").mkdir()
    demo_lora(folder / "good.safetensors", model=model)
    demo_lora(folder / "sub" / "inner.safetensors", model=model)
    demo_lora(root / "outside" / "secret.safetensors", seed=9, model=model)
    (folder / "escape.safetensors").symlink_to(root / "outside" / "secret.safetensors")
    (folder / "notes.txt").write_text("not a LoRA")
    server = Server(root / "outputs", model, root / "server.log", extra=("--lora-dir", str(folder))).start()
    try:
        yield {"server": server, "root": root, "folder": folder, "start": write_image(root / "s.png")}
    finally:
        server.stop()


def call(server: Server, name: str, data: list[Any]) -> tuple[str, Any]:
    from test_ui_security import call as rest_call

    return rest_call(server, name, data)


def wait_done(client, job: int) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.predict(job=job, api_name="/status"))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status


def test_the_folder_lists_only_its_own_safetensors_files(site):
    kind, payload = call(site["server"], "loras", [])
    assert kind == "complete" and payload == [["good.safetensors"]]


HOSTILE = ["../outside/secret.safetensors", "escape.safetensors", "sub/inner.safetensors", "missing.safetensors",
           "..", ".", "good.safetensors/..", "loras/../good.safetensors", "\\good.safetensors", "notes.txt",
           "good.safetensors\u0000"]


def test_hostile_names_and_weights_get_one_line_and_make_no_job(site):
    server, folder = site["server"], site["folder"]
    before = set(server.jobs())
    names = HOSTILE + [str(folder / "good.safetensors"), str(site["root"] / "outside" / "secret.safetensors")]
    cases = [(name, "unknown LoRA") for name in names]
    cases += [("good.safetensors:nan", "must be between"), ("good.safetensors:1e9", "must be between"),
              ("good.safetensors:heavy", "must be a number"),
              ("good.safetensors, good.safetensors:2", "chosen twice"), ([["good.safetensors", [1]]], "must be a number"),
              ([{"name": "/etc/passwd"}], "unknown LoRA"), ([{"path": "good.safetensors"}], "not a LoRA choice"),
              (123, "LoRAs must be text"), ({"name": "good.safetensors"}, "LoRAs must be text"),
              (", ".join(f"x{i}.safetensors" for i in range(17)), "at most 16")]
    for loras, expected in cases:
        kind, payload = call(server, "choose_loras", [loras])
        text = payload if isinstance(payload, str) else json.dumps(payload)
        assert kind == "error" and expected in text and "\n" not in text and GENERIC not in text, (loras, kind, text)
        assert str(site["root"]) not in text, (loras, text)  # a path sent is named by its last part only
    assert set(server.jobs()) == before  # nothing queued


def test_a_chosen_lora_is_kept_with_the_job_and_recorded_in_the_video(site, tmp_path):
    from gradio_client import Client, handle_file

    from framepack.video import read_metadata

    server, folder = site["server"], site["folder"]
    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    chosen = client.predict(loras="good.safetensors:0.5", api_name="/choose_loras")
    job = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=1.2, steps=1, seed=4,
                         api_name="/submit")
    status = wait_done(client, job["job"])
    assert status["settings"]["loras"] == chosen
    assert status["status"] == "done", status
    sha = status["settings"]["loras"][0]["sha256"]
    assert status["settings"]["loras"] == [{"name": "good.safetensors", "scale": 0.5, "sha256": sha}]
    assert str(site["root"]) not in json.dumps(status)
    record = server.jobs()[job["job"]]
    kept = json.loads((Path(record["job_dir"]) / "settings.json").read_text())["loras"]
    assert kept == [{"path": str((folder / "good.safetensors").resolve()), "scale": 0.5, "sha256": sha}]
    assert read_metadata(record["out"])["framepack"]["loras"] == [{"path": "good.safetensors", "scale": 0.5,
                                                                  "sha256": sha}]
    # the choice was this session's next submission's only: the one after it has no LoRA
    again = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=1.2, steps=1,
                           api_name="/submit")
    assert again["settings"]["loras"] == []
    client.predict(job=again["job"], api_name="/cancel")
    # or named with the submission itself, through the same checks
    named = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=1.2, steps=1,
                           loras="good.safetensors:0.25", api_name="/submit")
    assert named["settings"]["loras"] == [{"name": "good.safetensors", "scale": 0.25, "sha256": sha}]
    client.predict(job=named["job"], api_name="/cancel")
    with pytest.raises(Exception, match="fits|not|LoRA|lora") as refused:
        client.predict(image=handle_file(str(site["start"])), prompt="a red circle", loras="../secret:1",
                       api_name="/submit")
    assert str(site["root"]) not in str(refused.value)


def page_call(server: Server, fn_index: int, data: list[Any], session: str) -> list[Any]:
    """test_ui_memory's call of a page handler, in the given session (two calls share one)."""
    from unittest import mock

    import test_ui_memory

    with mock.patch.object(test_ui_memory.uuid, "uuid4", return_value=mock.Mock(hex=session)):
        return test_ui_memory.page_call(server, fn_index, data)


def submitted(message: str) -> int:
    match = re.match(r"Job (\d+) submitted", message)
    assert match, message
    return int(match.group(1))


def test_the_page_hands_its_lora_field_to_the_submission_of_the_same_click(site):
    """Generate runs on_loras (the LoRA field) then on_submit (the form) in one chain, per session."""
    from test_ui_security import upload

    from framepack.ui.app import FORM_FIELDS

    server = site["server"]
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        config = json.loads(response.read())
    index = {d.get("api_name"): d["id"] for d in config["dependencies"]}
    image = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    form = dict(image=image, end_image=None, prompt="a red circle", negative_prompt="", seconds=1.2, seed=1,
                random_seed=False, steps=1, distilled_guidance=10.0, cfg=1.0, sampler="unipc", mode="auto",
                model=Path(server.model).name, resolution="auto", crf=16, cache="none", preserve_gb=6)
    values = [form[name] for name in FORM_FIELDS]
    session = uuid.uuid4().hex
    page_call(server, index["on_loras"], ["good.safetensors:0.25"], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    job = submitted(message)
    assert json.loads(server.jobs()[job]["settings"])["loras"][0]["scale"] == 0.25
    page_call(server, index["on_loras"], ["../outside/secret.safetensors"], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    assert "unknown LoRA" in message and "\n" not in message
    # a submission of another session (or of a client calling the form handler alone) has no LoRA
    message, _ = page_call(server, index["on_submit"], values, uuid.uuid4().hex)
    job = submitted(message)
    assert json.loads(server.jobs()[job]["settings"])["loras"] == []


def test_lora_dir_must_be_a_folder(tmp_path):
    framepack = str(Path(sys.executable).with_name("framepack"))
    result = subprocess.run([framepack, "ui", "--lora-dir", str(tmp_path / "nope"), "--outputs", str(tmp_path / "o"),
                             "--device", "cpu"], check=False, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"framepack: error: --lora-dir {tmp_path / 'nope'} is not a directory"]


def test_folder_refuses_links_out_and_accepts_links_within(tmp_path):
    from framepack.ui.loras import LoraFolder, loras_from_form, loras_text

    folder = tmp_path / "loras"
    folder.mkdir()
    demo_lora(folder / "a.safetensors")
    (folder / "b.safetensors").symlink_to(folder / "a.safetensors")  # within the folder: the same file, allowed
    (folder / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    lf = LoraFolder(folder)
    assert lf.names() == ["a.safetensors", "b.safetensors"]
    choices = loras_from_form("a.safetensors:0.5, b.safetensors", lf)
    assert [c.scale for c in choices] == [0.5, 1.0] and choices[0].sha256 == choices[1].sha256
    assert loras_text([c._asdict() for c in choices]) == "a.safetensors:0.5, a.safetensors:1"
    with pytest.raises(ValueError, match="no LoRA folder"):
        loras_from_form("a.safetensors", None)
    assert loras_from_form("", None) == () and loras_from_form(None, lf) == ()
    assert loras_text("junk") == "" and loras_text([{"path": 5}]) == ""


def test_the_page_picks_loras_with_weights(site):
    """In a browser: the panel lists the folder, "Add a LoRA" writes name:1 into the field, the
    weight is edited there, Generate submits it; "use these settings" brings it back."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    from test_ui_browser import CHROMIUM, CHROMIUM_ARGS, fill_form, open_page, submit, wait_status

    server = site["server"]
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            with open_page(browser, server.url) as page:
                fill_form(page, site["start"], "a red circle", seconds=1.2, steps=1, seed=2)
                page.click("#fp-loras-panel")
                playwright_api.expect(page.locator("#fp-lora-list")).to_contain_text("good.safetensors")
                assert "escape" not in page.locator("#fp-lora-list").inner_text()
                page.locator("#fp-lora-add input").click()
                page.get_by_role("option", name="good.safetensors").click()
                box = page.locator("#fp-loras textarea")
                playwright_api.expect(box).to_have_value("good.safetensors:1")
                box.fill("good.safetensors:0.75")
                job = submit(page)
                assert json.loads(server.jobs()[job]["settings"])["loras"][0]["scale"] == 0.75
                wait_status(page, job, "done")
                box.fill("")
                page.click("button[role=tab]:has-text('History')")
                page.locator("#fp-history-job input").fill(str(job))
                page.click("#fp-use-settings")
                playwright_api.expect(page.locator("#fp-history-message")).to_contain_text(f"job {job}")
                page.click("button[role=tab]:has-text('Generate')")
                playwright_api.expect(box).to_have_value("good.safetensors:0.75")
        finally:
            browser.close()
