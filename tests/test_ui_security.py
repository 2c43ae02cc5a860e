"""The web app against a hostile but fair client, over HTTP and gradio_client against a running server.

- Only files uploaded to this server (or made by the app) are ever used: a path string, a
  ``{"path": ...}`` dict, a FileData naming a server file, ``..`` and a symlink out of the upload
  folder all get one message that does not depend on whether the file exists, no job is made, and
  the file's bytes never reach Gradio's cache or any reply.
- outputs/ is not served (the job store, the job directories, even the videos there: the page gets
  copies), and no reply carries an absolute server path.
- Job ids and limits of any type and size get a one-line message, never Gradio's generic error.
- A fuzz over every named endpoint: never the generic error, never the planted secret, and the
  server still serves afterwards.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ui_slow_server import Server
from ui_tiny_model import write_image, write_tiny_model

pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

JOB_TIMEOUT_S = 180
GENERIC = "upstream"  # Gradio's "The upstream Gradio app has raised an exception ..."
ENDPOINTS = ("submit", "status", "cancel", "resume", "video", "history", "queue", "redo")
SUBMIT_DEFAULTS = [None, "a red circle", None, "", 1.2, 1, False, 1, 10.0, 1.0, "unipc", "auto", None, "auto", 16, 6.0, "none",
                   "", 1, "", None, "", False]
SUBMIT_NAMES = ["image", "prompt", "end_image", "negative_prompt", "seconds", "seed", "random_seed", "steps",
                "distilled_guidance", "cfg", "sampler", "mode", "model", "resolution", "crf", "preserve", "cache", "loras",
                "count", "prompts", "keyframe_images", "keyframe_times", "color_match"]


# ---- the server ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A server with its own Gradio cache folder, and a secret image beside it that it must never read."""
    root = tmp_path_factory.mktemp("security")
    model = write_tiny_model(root / "model")
    secret_dir = root / "private"
    secret_dir.mkdir()
    secret = write_image(secret_dir / "secret.png", size=(64, 64), seed=123)  # a valid image: only the gate stops it
    cache = root / "gradio"
    server = Server(root / "outputs", model, root / "server.log", env={"GRADIO_TEMP_DIR": str(cache)},
                    verbose=False).start()  # logging as `framepack ui` has it by default
    try:
        yield {"server": server, "secret": secret, "cache": cache, "root": root, "start": write_image(root / "s.png")}
    finally:
        server.stop()


def call(server: Server, name: str, data: list[Any]) -> tuple[str, Any]:
    """One call through Gradio's REST API: ("complete", output), ("error", message) or ("http <code>", body)."""
    request = urllib.request.Request(f"{server.url}gradio_api/call/{name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            event = json.loads(response.read())["event_id"]
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}", exc.read().decode(errors="replace")
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{name}/{event}", timeout=120) as response:
        text = response.read().decode(errors="replace")
    kind, payload = "", None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            payload = json.loads(line[len("data: "):])
    if kind == "error":
        return "error", (payload or {}).get("error") if isinstance(payload, dict) else payload
    return kind, payload


def upload(server: Server, path: Path) -> str:
    """Upload a file as the page does; the server's path of the upload."""
    import httpx

    with path.open("rb") as f:
        response = httpx.post(f"{server.url}gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    response.raise_for_status()
    return response.json()[0]


def answer_text(kind: str, payload: Any) -> str:
    return payload if isinstance(payload, str) else json.dumps(payload)


def assert_clean_answer(kind: str, payload: Any) -> None:
    """A reply or a message with its reason: never Gradio's generic error."""
    if kind == "complete":
        return
    assert kind in ("error", "http 400"), (kind, payload)
    assert payload, f"an error without a message: {kind} {payload!r}"
    assert GENERIC not in answer_text(kind, payload)


def cached_copies(cache: Path, content: bytes) -> list[Path]:
    """Files in Gradio's cache folder whose bytes are ``content``."""
    return [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size == len(content)
            and p.read_bytes() == content]


def submit_data(image: Any, **changes: Any) -> list[Any]:
    values = dict(zip(SUBMIT_NAMES, [image, *SUBMIT_DEFAULTS[1:]]))
    return list({**values, **changes}.values())


# ---- point 1: only uploads ------------------------------------------------------------------------------------------


def test_only_uploaded_files_are_used(site):
    server, secret, cache = site["server"], site["secret"], site["cache"]
    content = secret.read_bytes()
    missing = secret.with_name("missing.png")
    link_dir = cache / "planted"
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "link.png").symlink_to(secret)  # a symlink in the upload folder, pointing out of it
    before = set(server.jobs())

    def refs(path: Path) -> list[Any]:
        meta = {"_type": "gradio.FileData"}
        return [str(path), {"path": str(path)}, {"path": str(path), "orig_name": "x.png"},
                {"path": str(path), "meta": meta}, {"path": f"{cache}/../{path.parent.name}/{path.name}", "meta": meta},
                f"{cache}/../{path.parent.name}/{path.name}"]

    answers: dict[str, list[str]] = {}
    for label, path in (("secret", secret), ("missing", missing)):
        answers[label] = []
        for ref in refs(path):
            kind, payload = call(server, "submit", submit_data(ref))
            assert kind != "complete", f"{ref!r} was accepted"
            assert_clean_answer(kind, payload)
            text = answer_text(kind, payload)
            assert str(path.parent) not in text and path.name not in text and "\n" not in text
            answers[label].append(f"{kind}: {text}")
    # the same answers whether the file exists or not: the replies tell nothing about the server's files
    assert answers["secret"] == answers["missing"]
    kind, payload = call(server, "submit", submit_data(str(link_dir / "link.png")))
    assert kind == "error" and "not a file uploaded" in payload
    # the page's own endpoint is guarded the same way (the request guard stands in front of every route)
    request = urllib.request.Request(
        f"{server.url}gradio_api/queue/join",
        data=json.dumps({"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}], "fn_index": 0,
                         "session_hash": "fuzz"}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400 and "not a file uploaded" in refused.value.read().decode()

    assert set(server.jobs()) == before  # no job was made from any of them
    assert cached_copies(cache, content) == [link_dir / "link.png"]  # never copied into Gradio's cache
    (link_dir / "link.png").unlink()

    # the control: an uploaded image is accepted, also when named through ".." inside the upload folder
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    uploaded = upload(server, site["start"])
    job = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=1.2, steps=1,
                         api_name="/submit")
    assert job["status"] in ("queued", "running", "done")
    client.predict(job=job["job"], api_name="/cancel")
    roundabout = f"{Path(uploaded).parent}/../{Path(uploaded).parent.name}/{Path(uploaded).name}"
    kind, payload = call(server, "submit", submit_data(roundabout))
    assert kind == "complete", payload
    client.predict(job=payload[0]["job"], api_name="/cancel")


# ---- point 2: what is served, and how paths are shown ------------------------------------------------------------


def strings(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for value in data.values():
            yield from strings(value)
    elif isinstance(data, list):
        for value in data:
            yield from strings(value)


def test_outputs_are_not_served_and_replies_name_no_server_path(site, tmp_path):
    from gradio_client import Client, handle_file

    server = site["server"]
    client = Client(server.url, verbose=False, download_files=str(tmp_path))
    job = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=1.2, steps=1, seed=4,
                         api_name="/submit")
    replies = [job]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.predict(job=job["job"], api_name="/status"))["status"] != "done":
        replies.append(status)
        assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.3)
    replies += [status, client.predict(api_name="/history"), client.predict(api_name="/queue")]
    for text in strings(replies):
        assert not text.startswith("/") and str(server.outputs) not in text and str(site["root"]) not in text, text

    # nor does the page: its HTML and its config (the model directory is offered by its name)
    for address in (server.url, f"{server.url}config", f"{server.url}gradio_api/info"):
        with urllib.request.urlopen(address, timeout=30) as response:
            page = response.read().decode(errors="replace")
        assert str(server.outputs) not in page and str(server.model) not in page, address

    record = server.jobs()[job["job"]]
    video = Path(record["out"])
    assert status["video"] == video.relative_to(server.outputs).as_posix()  # relative to the outputs folder
    # nothing under outputs/ is served as it is: the store, the job directory, the video itself
    for path in (server.outputs / "jobs.sqlite", server.outputs / "jobs.sqlite-wal", video,
                 *[p for p in Path(record["job_dir"]).rglob("*") if p.is_file()]):
        if not path.exists():
            continue
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.url}gradio_api/file={path}", timeout=30)
        assert refused.value.code == 403, path
    # the video comes through /video (a copy the app hands out), byte for byte
    assert Path(client.predict(job=job["job"], api_name="/video")).read_bytes() == video.read_bytes()
    # the server's console, at its default level, has a line for the job's start and end
    log = server.log.read_text()
    assert f"job {job['job']} started" in log and f"job {job['job']} done in" in log


# ---- point 3: every argument is checked, with a message --------------------------------------------------------------


BAD_JOBS = [1e30, "1e30", "inf", "-inf", "nan", 10**30, -(10**30), "abc", -1, 0, True, False, 2.5, "", [1], {"job": 1},
            "1; DROP TABLE jobs"]


def test_bad_job_ids_and_limits_get_a_message(site):
    server = site["server"]
    for name in ("status", "cancel", "resume", "video"):
        for job in BAD_JOBS:
            kind, payload = call(server, name, [job])
            assert kind == "error", (name, job, kind, payload)
            assert_clean_answer(kind, payload)
            assert "job" in payload and "\n" not in payload, (name, job, payload)
    for limit in ("abc", "nan", 1e30, 0, -5, 10**30, True, [3], {"a": 1}):
        kind, payload = call(server, "history", [limit])
        assert kind == "error" and "limit" in payload and "\n" not in payload, (limit, kind, payload)
    assert call(server, "history", [2])[0] == "complete"
    # too few values over REST (gradio_client fills in the defaults itself): one line too
    for name, data in (("status", []), ("submit", [None, "a prompt"])):
        kind, payload = call(server, name, data)
        assert kind == "http 400" and f"/{name} takes" in payload and "\\n" not in payload, (kind, payload)


def test_an_unknown_endpoint_is_named_not_a_server_fault(site):
    server = site["server"]
    assert call(server, "..%2f..%2fetc", [1])[0] == "http 404"  # no route at all: the server's own 404
    for name in ("nope", "submit_x", "a%0Ab"):
        kind, payload = call(server, name, [1])
        assert kind == "http 404", (name, kind, payload)
        message = json.loads(payload)["error"]
        assert message.startswith("no such endpoint; this app has ") and "/submit" in message
        assert "\n" not in message
    assert call(server, "history", [1])[0] == "complete"  # the known ones still answer


# ---- point 4: fuzz ---------------------------------------------------------------------------------------------


def hostile(site: dict[str, Any]) -> Any:
    """Values a hostile client might send for any argument."""
    server, secret = site["server"], site["secret"]
    paths = [str(secret), "/etc/passwd", "/etc/shadow", "/etc/nope", str(server.outputs / "jobs.sqlite"),
             "../../../../etc/passwd", str(server.outputs), "~/.bashrc", "file:///etc/passwd", "\x00", "/" * 5000,
             "http://127.0.0.1:1/x.png"]
    path = st.sampled_from(paths)
    meta = st.just({"_type": "gradio.FileData"})
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["nan", "inf", "-inf", "1e30", "", " "]),
        st.text(max_size=30), path)
    files = st.one_of(st.fixed_dictionaries({"path": path}), st.fixed_dictionaries({"path": path, "meta": meta}),
                      st.fixed_dictionaries({"path": st.one_of(st.integers(), st.none(), st.lists(path, max_size=2))}))
    return st.one_of(scalars, files, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars,
                                                                                    max_size=3))


def test_fuzz_every_endpoint(site):
    server, secret, cache = site["server"], site["secret"], site["cache"]
    content = secret.read_bytes()
    before = set(server.jobs())
    arity = {"submit": len(SUBMIT_DEFAULTS), "status": 1, "cancel": 1, "resume": 1, "video": 1, "history": 1,
             "queue": 0, "redo": 4}
    seen: list[tuple[str, list[Any], str, Any]] = []
    secret_text = content.decode("latin-1")

    # no shrinking: each example is a request to a live server, and the first failure says enough
    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None,
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(name=st.sampled_from(ENDPOINTS), data=st.data())
    def one(name: str, data) -> None:
        count = arity[name]
        # some calls with too few arguments, as a careless client sends them
        n = data.draw(st.sampled_from([count, count, count, max(0, count - 1)]), label="arguments")
        args = [data.draw(hostile(site), label=f"arg{i}") for i in range(n)]
        kind, payload = call(server, name, args)
        seen.append((name, args, kind, payload))
        text = answer_text(kind, payload)
        assert secret_text not in text  # (its name may come back: Gradio quotes what a client sent)
        assert_clean_answer(kind, payload)
        if n < count:  # refused: too few values (or a file that is not an upload)
            assert kind == "http 400" and "\\n" not in text, (name, args, kind, payload)

    started = time.monotonic()
    one()
    assert time.monotonic() - started < 90
    names = {name for name, *_ in seen}
    assert names == set(ENDPOINTS)
    assert set(server.jobs()) == before  # not one job from hostile input
    assert cached_copies(cache, content) == []  # the secret was never read into Gradio's cache
    # still serving, the page and the API
    with urllib.request.urlopen(server.url, timeout=30) as response:
        assert response.status == 200
    kind, payload = call(server, "history", [5])
    assert kind == "complete" and isinstance(payload[0], list)


# ---- issue 20: keyframes, text-to-video and colour matching through /submit and the page ----------------------------


def test_hostile_keyframe_and_colour_fields_get_one_line_and_queue_nothing(site, tmp_path):
    server, secret = site["server"], site["secret"]
    image = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    key = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    (tmp_path / "notes.png").write_text("not an image at all")
    text_file = {"path": upload(server, tmp_path / "notes.png"), "meta": {"_type": "gradio.FileData"}}
    before = set(server.jobs())
    cases = [
        (dict(keyframe_images=str(secret), keyframe_times="1.2"), "error", "keyframe image 1: not a file uploaded"),
        (dict(keyframe_images=["/etc/passwd"], keyframe_times="1.2"), "error", "keyframe image 1: not a file uploaded"),
        (dict(keyframe_images=[{"path": str(secret)}], keyframe_times="1.2"), "error", "not a file uploaded"),
        (dict(keyframe_images=["http://127.0.0.1:1/x.png"], keyframe_times="1.2"), "error", "not a file uploaded"),
        (dict(keyframe_images=[{"path": str(secret), "meta": {"_type": "gradio.FileData"}}], keyframe_times="1.2"),
         "http 400", "not a file uploaded"),
        (dict(keyframe_images=[text_file], keyframe_times="1.2"), "error", "keyframe image 1 (1.2 s)"),
        (dict(keyframe_images=[key], keyframe_times="30", seconds=2.4), "error", "is outside the"),
        (dict(keyframe_images=[key], keyframe_times="-1", seconds=2.4), "error", "is outside the"),
        (dict(keyframe_images=[key], keyframe_times="abc"), "error", "keyframe time 1 must be a number"),
        (dict(keyframe_images=[key] * 65, keyframe_times=", ".join(["1.2"] * 65)), "error", "at most 64 keyframes"),
        (dict(keyframe_images=[key, key], keyframe_times="1.2", seconds=3.6), "error", "2 keyframe images and 1"),
        (dict(keyframe_images=[key, key], keyframe_times="1.2, 1.3", seconds=3.6), "error", "both snap to"),
        (dict(keyframe_images=[key], keyframe_times="1.2", mode="forward", seconds=2.4), "error", "need mode 'inverted'"),
        (dict(color_match="sepia"), "error", "unknown colour match 'sepia'"),
        (dict(color_match=[1]), "error", "unknown colour match"),
    ]
    for changes, kind_expected, expected in cases:
        kind, payload = call(server, "submit", submit_data(image, **changes))
        text = answer_text(kind, payload)
        assert kind == kind_expected and expected in text, (changes, kind, text)
        assert "\n" not in text and GENERIC not in text and str(site["root"]) not in text, (changes, text)
    # text-to-video with colour matching has no start image to match: one line too
    kind, payload = call(server, "submit", submit_data(None, color_match=True))
    assert kind == "error" and "needs a start image" in payload, payload
    assert set(server.jobs()) == before  # nothing queued
    # the control: text-to-video alone is a job (no start image), recorded as such
    kind, payload = call(server, "submit", submit_data(None))
    assert kind == "complete", payload
    call(server, "cancel", [payload[0]["job"]])
    assert payload[0]["settings"]["image"] is None


def test_the_page_sends_its_keyframe_fields_through_the_same_checks(site):
    """Generate hands the keyframe and colour fields over (on_extras), then on_submit checks them with the form."""
    from test_ui_lora import page_call

    from framepack.ui.app import EXTRA_FIELDS, FORM_FIELDS

    server, secret = site["server"], site["secret"]
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        index = {d.get("api_name"): d["id"] for d in json.loads(response.read())["dependencies"]}
    assert EXTRA_FIELDS == ("keyframe_images", "keyframe_times", "color_match")
    image = {"path": upload(server, site["start"]), "meta": {"_type": "gradio.FileData"}}
    form = dict(image=image, end_image=None, prompt="a red circle", negative_prompt="", seconds=2.4, seed=1,
                random_seed=False, steps=1, distilled_guidance=10.0, cfg=1.0, sampler="unipc", mode="auto",
                model=Path(server.model).name, resolution="auto", crf=16, cache="none", preserve_gb=6)
    values = [form[name] for name in FORM_FIELDS]
    before = set(server.jobs())
    session = "keyframes-page"
    for keyframes in ([str(secret)], [{"path": str(secret)}], [image, "/etc/passwd"], [3]):  # never uploaded
        request = urllib.request.Request(
            f"{server.url}gradio_api/queue/join",
            data=json.dumps({"data": [keyframes, "1.2", False], "fn_index": index["on_extras"],
                             "session_hash": session}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        answer = refused.value.read().decode()
        assert refused.value.code == 400 and "not a file uploaded" in answer and str(secret.parent) not in answer
    # a keyframe the page did send (an upload) is still checked by the form with the rest: one line
    page_call(server, index["on_extras"], [[image], "9.9", False], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    assert "fp-error" in message and "is outside the" in message and "\n" not in message, message
    assert set(server.jobs()) == before
    page_call(server, index["on_extras"], [[image], "1.2", True], session)
    message, _ = page_call(server, index["on_submit"], values, session)
    job = int(message.split()[1])
    call(server, "cancel", [job])
    settings = json.loads(server.jobs()[job]["settings"])
    assert [k["seconds"] for k in settings["keyframes"]] == [1.2] and settings["color_match"] == "lab"


def test_a_keyframe_job_from_the_web_app_is_the_clis_job(site, tmp_path):
    """One job end to end through gradio_client: a keyframe and colour matching, recorded without server
    paths, and the video the same frames as `framepack generate` makes from the same inputs."""
    import subprocess

    from gradio_client import Client, handle_file
    from test_generate import FRAMEPACK

    import torch
    from safetensors.torch import load_file

    from framepack.video import read_frames

    server = site["server"]
    key = write_image(tmp_path / "key.png", seed=9)
    client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
    job = client.predict(image=handle_file(str(site["start"])), prompt="a red circle", seconds=2.4, steps=1, seed=5,
                         cfg=1.0, keyframe_images=[handle_file(str(key))], keyframe_times="1.2s", color_match=True,
                         api_name="/submit")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.predict(job=job["job"], api_name="/status"))["status"] != "done":
        assert status["status"] in ("queued", "running") and time.monotonic() < deadline, status
        time.sleep(0.3)
    [keyframe] = status["settings"]["keyframes"]
    assert keyframe["seconds"] == 1.2 and keyframe["image"].endswith("key.png")
    assert not keyframe["image"].startswith("/") and status["settings"]["color_match"] == "lab"
    web = Path(client.predict(job=job["job"], api_name="/video"))
    out = tmp_path / "cli.mp4"
    result = subprocess.run([FRAMEPACK, "generate", "--from", str(web), "--model", str(server.model), "--image",
                             str(site["start"]), "--keyframe", f"1.2:{key}", "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # The same job, to float32 rounding: in one full test run of many, the server's latents differed
    # from the CLI's by a few ulps (7e-7 where they reach 4.5; not reproduced in one process, with
    # other thread counts, beside busy threads or after the module's earlier jobs), and so a few
    # pixels of one frame by 2 levels. A setting that differs is far outside this: another seed moves
    # the latents by up to 6.6 and 96% of the pixels; colour matching off changes 99% of the pixels.
    web_job, cli_job = Path(server.jobs()[job["job"]]["job_dir"]), out.with_suffix(".job")  # as each recorded it
    for section in sorted((cli_job / "sections").glob("*.safetensors")):
        mine, theirs = load_file(section)["latents"], load_file(web_job / "sections" / section.name)["latents"]
        assert torch.allclose(mine, theirs, rtol=0, atol=1e-5), (section.name, (mine - theirs).abs().max())
    frames = read_frames(web).astype(np.int16) - read_frames(out).astype(np.int16)
    assert np.abs(frames).max() <= 2 and np.count_nonzero(frames) < 1e-3 * frames.size

    # History's "Use these settings" puts the job's keyframe (a served copy of its own) and colour box back
    from test_ui_lora import page_call

    from framepack.ui.app import EXTRA_FIELDS, FORM_FIELDS

    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        index = {d.get("api_name"): d["id"] for d in json.loads(response.read())["dependencies"]}
    filled = page_call(server, index["on_use"], [str(job["job"])], "use-keyframes")
    extras = dict(zip(EXTRA_FIELDS, filled[len(FORM_FIELDS):]))
    [copy] = extras["keyframe_images"]
    served = copy["path"] if isinstance(copy, dict) else copy
    assert Path(served).read_bytes() == key.read_bytes() and not Path(served).is_relative_to(server.outputs)
    assert extras["keyframe_times"] == "1.2" and extras["color_match"] is True
