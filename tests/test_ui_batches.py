"""Batches in the web app's queue (issue 20.5) and its notes on the model's world (issue 18.5), over
HTTP and gradio_client against a running server.

A submission's ``count`` (seeds S, S+1, ...) and ``prompts`` (one job per line, or a JSON object of
settings) are read by the CLI's own reader (framepack.batch) and every job by the form's parsers;
each job is its own queue entry. Hostile values get one line and queue nothing. A job that leaves
the model's world is queued with a note beside it, not refused.
"""

from __future__ import annotations

import html
import json
import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_ui_lora import page_call
from test_ui_security import call, submit_data, upload
from ui_slow_server import Server
from ui_tiny_model import write_image, write_tiny_model

pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")

GENERIC = "upstream"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tests' tiny 64 px model, given the demo model's world description (so it takes notes)."""
    from framepack.components import asset
    from framepack.train import world

    root = tmp_path_factory.mktemp("ui_batches")
    model = write_tiny_model(root / "model")
    manifest = json.loads((model / "framepack.json").read_text())
    manifest["world"] = json.loads(asset("tiny", "framepack.json").read_text())["world"]
    (model / "framepack.json").write_text(json.dumps(manifest))
    scene = world.scenes("validation", 1)[0]
    from PIL import Image

    Image.fromarray(world.render(scene, 1, size=64)[0]).save(root / "scene.png")
    server = Server(root / "outputs", model, root / "server.log").start()
    try:
        yield {"server": server, "root": root, "start": write_image(root / "s.png"), "scene": root / "scene.png",
               "caption": world.caption(scene)}
    finally:
        server.stop()


def client_of(site: dict[str, Any], tmp_path: Path):
    from gradio_client import Client

    return Client(site["server"].url, verbose=False, download_files=str(tmp_path))


def cancel_all(client, jobs: list[int]) -> None:
    for job in jobs:  # the queue is not the subject here: spare the CPU
        client.predict(job=job, api_name="/cancel")


def settings_of(server: Server, jobs: list[int]) -> list[dict]:
    records = server.jobs()
    return [json.loads(records[job]["settings"]) for job in jobs]


def test_count_and_prompts_queue_one_job_each_as_the_cli_would(site, tmp_path):
    from gradio_client import handle_file

    from framepack.batch import expand, read_prompts

    server, client = site["server"], client_of(site, tmp_path)
    image = handle_file(str(site["start"]))
    answer = client.predict(image=image, prompt="a red circle", seconds=1.2, steps=1, seed=7, count=3,
                            api_name="/submit")
    jobs = answer["jobs"]
    cancel_all(client, jobs)
    assert answer["job"] == jobs[0] and len(set(jobs)) == 3
    kept = settings_of(server, jobs)
    assert [s["seed"] for s in kept] == [7, 8, 9] and {s["prompt"] for s in kept} == {"a red circle"}
    records = server.jobs()
    assert len({records[j]["job_dir"] for j in jobs}) == 3 and len({records[j]["out"] for j in jobs}) == 3

    lines = 'a red circle moves up\n\n# a comment\n{"prompt": "a blue square grows", "seed": 40, "steps": 2}\n'
    answer = client.predict(image=image, prompt="unused", seconds=1.2, steps=1, seed=3, count=2, prompts=lines,
                            api_name="/submit")
    jobs = answer["jobs"]
    cancel_all(client, jobs)
    kept = settings_of(server, jobs)
    # the jobs framepack generate --count 2 --prompts FILE makes from the same text
    (tmp_path / "prompts.txt").write_text(lines)
    cli = expand({"seed": 3, "steps": 1}, read_prompts(tmp_path / "prompts.txt"), 2, tmp_path / "v.mp4", 0)
    assert [(s["prompt"], s["seed"], s["steps"]) for s in kept] == [
        (job.settings["prompt"], job.settings["seed"], job.settings["steps"]) for job in cli]
    assert len(jobs) == 4 and all(s["seconds"] == 1.2 for s in kept)


def submit_values(image: Any, count: Any, prompts: Any) -> list[Any]:
    """/submit's values over REST, in its order, with these count and prompts."""
    return submit_data(image, count=count, prompts=prompts)


def test_hostile_batches_get_one_line_and_queue_nothing(site):
    server, root = site["server"], site["root"]
    image = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    before = set(server.jobs())
    cases = [(0, "", "count must be at least 1"), (10**6, "", "at most 1000"), ("x", "", "count must be a number"),
             (-3, "", "at least 1"), (2.5, "", "whole number"), (True, "", "count must be a number"),
             ([2], "", "count must be a number"), (600, "a\nb", "1200 jobs; at most 1000"),
             (1, 5, "prompts must be text"), (1, "# only a comment", "holds no prompt"),
             (1, "{oops", "line 1: not valid JSON"), (1, "[1, 2]", "malformed prompt timeline"),
             (1, '{"prompt": "x", "seed": "y"}', "seed must be an integer"),
             (1, 'a\n{"prompt": "x", "steps": 0}', "batch job 2 (line 2): steps")]
    # a file on the server, named in the field or in a line, is never read
    for name in ("/etc/passwd", str(server.outputs / "jobs.sqlite"), "~/.ssh/id_rsa", "prompts.txt", "..\\x"):
        cases.append((1, name, "looks like a file name"))
    for key, value in (("image", "/etc/passwd"), ("end_image", {"path": str(site["start"])}), ("loras", "../a:1"),
                       ("keyframes", [[1, "/etc/passwd"]])):
        cases.append((1, json.dumps({"prompt": "x", key: value}), f"{key!r} cannot be set per line"))
    cases.append((2, json.dumps({"prompt": "x", "model": "/etc"}), "unknown model"))
    for count, prompts, expected in cases:
        kind, payload = call(server, "submit", submit_values(image, count, prompts))
        text = payload if isinstance(payload, str) else json.dumps(payload)
        assert kind == "error" and expected in text, (count, prompts, kind, text)
        assert "\n" not in text and GENERIC not in text and str(root) not in text, (count, prompts, text)
    assert set(server.jobs()) == before  # nothing queued


def test_notes_on_the_models_world_come_with_the_job(site, tmp_path):
    from gradio_client import handle_file

    client = client_of(site, tmp_path)
    noise = tmp_path / "noise.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    answer = client.predict(image=handle_file(str(noise)), prompt="a dog jumps", seconds=1.2, steps=1, count=2,
                            api_name="/submit")
    cancel_all(client, answer["jobs"])
    assert len(answer["jobs"]) == 2 and len(answer["notes"]) == 2  # queued all the same; each note said once
    assert "never learned: 'dog', 'jumps'" in answer["notes"][0] and "stripes" in answer["notes"][1]
    answer = client.predict(image=handle_file(str(site["scene"])), prompt=site["caption"], seconds=1.2, steps=1,
                            api_name="/submit")
    cancel_all(client, answer["jobs"])
    assert answer["notes"] == [] and answer["jobs"] == [answer["job"]]


def test_the_page_queues_a_batch_and_shows_the_notes(site):
    """Generate runs on_batch (the Batch fields) then on_submit (the form), per session."""
    from dataclasses import asdict

    from framepack.ui.app import FORM_FIELDS
    from framepack.ui.form import FormDefaults

    server = site["server"]
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        index = {d.get("api_name"): d["id"] for d in json.loads(response.read())["dependencies"]}
    # what a fresh page sends, with an upload, a short video and this server's model
    image = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    form = {**asdict(FormDefaults()), "image": image, "end_image": None, "model": Path(server.model).name,
            "prompt": "a red circle", "seconds": 1.2, "steps": 1, "seed": 11, "cache": "none"}
    values = [form[name] for name in FORM_FIELDS]
    before = set(server.jobs())
    session = uuid.uuid4().hex
    page_call(server, index["on_batch"], [3, "a red circle moves up\na dog sits"], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    found = re.match(r"Jobs (\d+) to (\d+) submitted \(6 jobs", message)
    assert found, message
    jobs = sorted(set(server.jobs()) - before)
    assert jobs == list(range(int(found.group(1)), int(found.group(2)) + 1))
    for job in jobs:
        call(server, "cancel", [job])
    assert [s["seed"] for s in settings_of(server, jobs)] == [11, 12, 13, 11, 12, 13]
    assert "fp-note" in message and "never learned: 'dog', 'sits'" in html.unescape(message)  # beside the submission
    # a bad count through the page: one line beside the button, nothing queued
    page_call(server, index["on_batch"], ["many", ""], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    assert "count must be a number" in message and "fp-error" in message and "\n" not in message
    # the Batch fields were this click's only: the next submission of the session is one job
    message, _ = page_call(server, index["on_submit"], values, session)
    assert re.match(r"Job \d+ submitted", message), message
    call(server, "cancel", [max(server.jobs())])
    assert len(server.jobs()) == len(before) + 7
