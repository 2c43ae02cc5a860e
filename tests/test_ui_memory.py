"""The web app's memory plans: the "GPU memory to preserve" control, the "Memory plan" panel, and
the worker applying a job's plan.

There is no GPU here: CUDA's free memory is monkeypatched (``torch.cuda.mem_get_info``) where a
plan is made for ``cuda``, and where a worker applies one, ``runtime.apply.apply_plan`` places the
pipeline on the CPU instead (moving is then a no-op). That the placement itself works on a GPU is
not shown by these tests (docs/ui.md says so).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from ui_slow_server import Server
from ui_tiny_model import write_image, write_tiny_model

from framepack.runtime import apply as runtime_apply
from framepack.runtime.plan import GiB, NoPlanError
from framepack.settings import GenerationSettings
from framepack.ui.form import preserve_gb
from framepack.ui.memory import NO_PLAN, job_plan, plan_panel
from framepack.ui.service import OFFLOAD_DIR, JobService

pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")

TIMEOUT_S = 180
FREE = 40 * GiB  # what the monkeypatched GPU reports free
TOTAL = 80 * GiB
BAD_PRESERVE = [-1, -0.5, 128.5, 1e30, "nan", "inf", "-inf", "abc", "", None, True, [6], {"gb": 6}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("memory_model"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("memory_image") / "start.png")


def settings(model: Path, image: Path | str = "", **changes: Any) -> GenerationSettings:
    base = dict(image=str(image), prompt="a red circle moves to the right", model=str(model), seconds=1.0, steps=1)
    return GenerationSettings(**{**base, **changes})


@pytest.fixture
def gpu(monkeypatch) -> dict[str, int]:
    """A CUDA GPU as torch.cuda.mem_get_info reports it; change ``free`` to change what it reports."""
    memory = {"free": FREE, "total": TOTAL}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], memory["total"]))
    return memory


# ---- the control: one validation layer -------------------------------------------------------------------


def test_preserve_is_checked_by_the_form_parser():
    for good in (0, 6, "6", 2.5, "0.5", 128):
        assert preserve_gb(good) == float(good)
    for bad in BAD_PRESERVE:
        with pytest.raises(ValueError, match="GPU memory to preserve") as refused:
            preserve_gb(bad)
        assert "\n" not in str(refused.value)


# ---- the worker's plan ----------------------------------------------------------------------------------------


def test_a_cuda_job_is_planned_for_the_free_memory_less_what_it_preserves(model, gpu):
    cuda = torch.device("cuda")
    for preserve in (0.0, 6.0, 12.5):
        plan = job_plan(settings(model), cuda, preserve)
        assert plan is not None and plan.budget is not None
        assert plan.budget.vram == FREE - int(preserve * GiB)
        assert plan.fits(plan.budget)
    # a job queued without a value gets the reference's default of 6 GB
    assert job_plan(settings(model), cuda, None).budget.vram == FREE - 6 * GiB


def test_preserving_too_much_is_one_line(model, gpu):
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match="leaves nothing") as nothing:
        job_plan(settings(model), cuda, FREE / GiB + 1)
    assert "\n" not in str(nothing.value)
    gpu["free"] = 6 * GiB + 1024  # 1 kB left after preserving: some memory, but no plan fits it
    with pytest.raises(NoPlanError, match="smallest that works") as small:
        job_plan(settings(model), cuda, 6)
    assert "\n" not in str(small.value)


def test_no_plan_off_cuda(model, gpu):
    assert job_plan(settings(model), torch.device("cpu"), 6) is None
    assert job_plan(settings(model), None, 6) is None  # a worker whose device only its loader knows


def test_the_panel_shows_a_gpu_plan_by_the_model_name_or_the_reason(model, gpu):
    cuda = torch.device("cuda")
    text = plan_panel(settings(model), [cuda, cuda], 6, "my-model")
    assert text.count("memory plan for my-model") == 1  # two workers on one GPU: one plan
    assert f"budget {(FREE - 6 * GiB) / GiB:.1f} GB VRAM" in text
    assert str(model) not in text  # the model directory is named, never where it lies
    both = plan_panel(settings(model), [torch.device("cpu"), cuda], 6, "my-model")
    assert both.startswith(NO_PLAN) and "memory plan for my-model" in both
    refused = plan_panel(settings(model), [cuda], FREE / GiB + 1, "my-model")
    assert "leaves nothing" in refused and "memory plan for" not in refused and "\n" not in refused
    gpu["free"] = 6 * GiB + 1024
    too_small = plan_panel(settings(model), [cuda], 6, "my-model")
    assert "no memory plan for my-model" in too_small and "smallest that works" in too_small
    assert str(model) not in too_small and "\n" not in too_small


def test_the_apps_panel_on_a_cuda_service_shows_the_plan_and_waits_for_no_load(tmp_path, model, gpu):
    """The page's handler, in-process (a server here has no GPU to serve): the plan by the model's
    name; while a worker loads a model (the load lock held), the panel says so instead of sizing."""
    from framepack.ui.app import PLAN_WAIT_S, build_app
    from framepack.ui.memory import BUSY

    service = JobService(tmp_path / "out", [lambda name: None], devices=["cuda"])  # never started: no job runs
    app = build_app(service, [str(model)])
    on_plan = next(f.fn for f in app.fns.values() if f.api_name == "on_plan")
    text = on_plan(model.name, "auto", 1.0, 6)
    assert f"memory plan for {model.name}:" in text and str(model.parent) not in text
    assert f"budget {(FREE - 6 * GiB) / GiB:.1f} GB VRAM" in text
    assert "GPU memory to preserve" in on_plan(model.name, "auto", 1.0, -1)
    with service.loading:  # a worker is loading
        began = time.monotonic()
        assert on_plan(model.name, "auto", 1.0, 6) == BUSY
        assert time.monotonic() - began >= PLAN_WAIT_S * 0.9


# ---- the worker applies it ------------------------------------------------------------------------------------


def test_a_cuda_worker_applies_each_jobs_plan_and_keeps_no_pipeline(tmp_path, model, image, gpu, monkeypatch):
    from framepack.pipeline import FramePackPipeline

    loads: list[Any] = []  # the plan each load was made for
    placed: list[tuple[Any, torch.device, Path]] = []
    written: list[int] = []  # offload files under the offload folder while each job ran
    real_apply = runtime_apply.apply_plan

    def load(name: str, plan=None) -> FramePackPipeline:
        loads.append(plan)
        return FramePackPipeline.from_model(name)

    def apply_on_cpu(pipeline, plan, device, offload_dir=None):
        placed.append((plan, device, offload_dir))
        # no GPU here: placed on the CPU, the transformer offloaded to disk (the tiny model never
        # needs it), so that the job writes offload files the worker must remove
        on_disk = replace(plan, components=tuple(
            replace(c, choice=replace(c.choice, placement="disk")) if c.name == runtime_apply.TRANSFORMER else c
            for c in plan.components))
        placement = real_apply(pipeline, on_disk, "cpu", offload_dir=offload_dir)
        written.append(sum(1 for f in Path(offload_dir).rglob("*") if f.is_file()))
        return placement

    monkeypatch.setattr(runtime_apply, "apply_plan", apply_on_cpu)
    service = JobService(tmp_path / "out", [load], devices=["cuda"]).start()
    try:
        a = service.submit(settings(model, image, seed=1), preserve_gb=2.0)
        b = service.submit(settings(model, image, seed=2))  # no value: the default
        gpu_full = service.submit(settings(model, image, seed=3), preserve_gb=FREE / GiB + 1)

        def finished() -> bool:
            return all(service.view(j.id).record.status in ("done", "failed") for j in (a, b, gpu_full))

        _wait(finished, "three jobs")
        assert [service.view(j.id).record.status for j in (a, b)] == ["done", "done"]
        failed = service.view(gpu_full.id).record
        assert failed.status == "failed" and "leaves nothing" in failed.error and "\n" not in failed.error
    finally:
        service.stop(TIMEOUT_S)
    # one load per planned job (none for the one that could not be planned): nothing kept between them
    assert len(loads) == 2 and all(plan is not None for plan in loads)
    assert [plan.budget.vram for plan in loads] == [FREE - 2 * GiB, FREE - 6 * GiB]
    assert [p for p, _, _ in placed] == loads  # each job's own plan, applied to the pipeline loaded for it
    assert all(device == torch.device("cuda") for _, device, _ in placed)
    offload = service.outputs / OFFLOAD_DIR
    assert all(folder == offload for _, _, folder in placed)
    assert all(count > 0 for count in written) and not offload.exists()  # written while each job ran, removed after
    assert "preserve_gb" not in service.view(a.id).record.settings  # the run's, not the video's


def test_the_apps_loader_loads_a_planned_job_on_the_host_in_the_plans_storage(model, gpu):
    """``framepack ui``'s loader: without a plan on the worker's device; with one on the host, the
    transformer's block weights read straight into fp8 when the plan stores it so."""
    from framepack.model.io import fp8_weight_names
    from framepack.ui.worker import pipeline_loader

    cuda = torch.device("cuda")
    plan = job_plan(settings(model), cuda, 6)
    fp8 = replace(plan, components=tuple(
        replace(c, choice=replace(c.choice, storage="fp8")) if c.name == runtime_apply.TRANSFORMER else c
        for c in plan.components))
    pipeline = pipeline_loader(cuda, torch.float32)(str(model), fp8)
    assert pipeline.device == cuda  # where the plan places it; loaded on the host until then
    transformer = pipeline.c.transformer
    assert {p.device.type for p in transformer.parameters()} == {"cpu"}
    weights = dict(transformer.named_parameters())
    names = fp8_weight_names(transformer)
    assert names and {weights[name].dtype for name in names} == {torch.float8_e4m3fn}
    unplanned = pipeline_loader(cuda, torch.float32)(str(model), plan).c.transformer  # bf16 storage: as loaded
    assert {p.dtype for p in unplanned.parameters()} == {torch.float32}


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- through the running app ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, model) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("memory_server")
    server = Server(root / "outputs", model, root / "server.log").start()  # one CPU worker
    try:
        yield server
    finally:
        server.stop()


def page_config(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        return json.loads(response.read())


def handler(config: dict[str, Any], name: str) -> int:
    """The fn_index of one of the page's handlers, by its function's name."""
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == name)


def page_call(server: Server, fn_index: int, data: list[Any]) -> list[Any]:
    """Call one of the page's handlers as the page does (queue/join, then its event stream)."""
    session = uuid.uuid4().hex
    request = urllib.request.Request(f"{server.url}gradio_api/queue/join", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"data": data, "fn_index": fn_index, "session_hash": session,
                                                      "trigger_id": None}).encode())
    urllib.request.urlopen(request, timeout=30).read()
    with urllib.request.urlopen(f"{server.url}gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data:"):
                message = json.loads(line[len("data:"):])
                if message.get("msg") == "process_completed":
                    assert message.get("success"), message
                    return message["output"]["data"]
    raise AssertionError("the event stream ended before the handler completed")


def upload(server: Server, path: Path) -> dict[str, Any]:
    import httpx

    with path.open("rb") as f:
        response = httpx.post(f"{server.url}gradio_api/upload", files={"files": (path.name, f)}, timeout=60)
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def test_the_panel_on_a_cpu_server_says_there_is_no_plan(server):
    config = page_config(server)
    panel = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "fp-plan")
    assert panel["props"]["value"] == NO_PLAN  # shown at once: a CPU server has nothing to compute
    plan = handler(config, "on_plan")
    model = Path(server.model).name
    for resolution, cfg, preserve in ((None, 3.0, 6), ("64", 1.0, 0), ("auto", None, "128")):
        assert page_call(server, plan, [model, resolution, cfg, preserve]) == [NO_PLAN]
    for bad in ("nan", 129, None):  # the same parser as a submission: one line, no plan
        [reply] = page_call(server, plan, [model, "auto", 3.0, bad])
        assert "GPU memory to preserve" in reply and "\n" not in reply and reply != NO_PLAN
    [reply] = page_call(server, plan, [str(server.model), "auto", 3.0, 6])  # a path in place of the name
    assert reply == NO_PLAN or "unknown model" in reply
    assert str(server.model.parent) not in reply


def test_a_submission_with_a_bad_preserve_value_is_refused_with_one_line(server, tmp_path):
    from framepack.ui.app import FORM_FIELDS

    config = page_config(server)
    submit = handler(config, "on_submit")
    start = upload(server, write_image(tmp_path / "start.png"))
    form = dict(image=start, end_image=None, prompt="a red circle", negative_prompt="", seconds=1.2, seed=1,
                random_seed=False, steps=1, distilled_guidance=10.0, cfg=1.0, sampler="unipc", mode="auto",
                model=Path(server.model).name, resolution="auto", crf=16, cache="none", preserve_gb=6)
    before = set(server.jobs())
    for bad in BAD_PRESERVE:
        message, _ = page_call(server, submit, [{**form, "preserve_gb": bad}[name] for name in FORM_FIELDS])
        assert "GPU memory to preserve" in message and "\n" not in message, (bad, message)
    assert set(server.jobs()) == before  # nothing queued

    message, _ = page_call(server, submit, [{**form, "preserve_gb": "2.5"}[name] for name in FORM_FIELDS])
    submitted = re.match(r"Job (\d+) submitted", message)
    assert submitted, message
    job = int(submitted.group(1))
    row = server.jobs()[job]
    assert row["preserve_gb"] == 2.5  # kept with the queued job, for its worker
    assert "preserve_gb" not in json.loads(row["settings"])  # not a setting of the video
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    assert client.predict(job=job, api_name="/status")["preserve_gb"] == 2.5
    client.predict(job=job, api_name="/cancel")


def test_the_api_submit_takes_preserve_through_the_same_parser(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server.url, verbose=False)
    start = write_image(tmp_path / "api.png")
    before = set(server.jobs())
    for bad in (-1, 129, "lots"):
        with pytest.raises(Exception, match="GPU memory to preserve"):
            client.predict(image=handle_file(str(start)), prompt="a red circle", seconds=1.2, steps=1, preserve=bad,
                           api_name="/submit")
    assert set(server.jobs()) == before
    job = client.predict(image=handle_file(str(start)), prompt="a red circle", seconds=1.2, steps=1, preserve=3,
                         api_name="/submit")["job"]
    assert server.jobs()[job]["preserve_gb"] == 3.0
    default = client.predict(image=handle_file(str(start)), prompt="a red circle", seconds=1.2, steps=1,
                             api_name="/submit")["job"]
    assert server.jobs()[default]["preserve_gb"] == 6.0  # the reference's default
    with pytest.raises(Exception, match="unknown cache"):  # the step cache, through the same form layer
        client.predict(image=handle_file(str(start)), prompt="a red circle", seconds=1.2, steps=1, cache="turbo",
                       api_name="/submit")
    cached = client.predict(image=handle_file(str(start)), prompt="a red circle", seconds=1.2, steps=1,
                            cache="teacache:0.3", api_name="/submit")["job"]
    assert json.loads(server.jobs()[cached]["settings"])["cache"] == "teacache:0.3"
    assert json.loads(server.jobs()[default]["settings"])["cache"] == "model"
    for done in (job, default, cached):
        client.predict(job=done, api_name="/cancel")
