"""Which files a request may name, which files the app hands out, and how paths are shown.

Every file reference that arrives from a page or an API client (a path string, a ``{"path": ...}``
dict, a Gradio ``FileData``) goes through :meth:`FileGate.upload`: only files that Gradio itself
received as uploads for this app, or that the app handed out itself, are accepted. Anything else (a server
path, a path with ``..``, a symlink out of the cache, a file that does not exist) is refused with
one message that says nothing about the path, so the answer never tells whether a file exists.

The app's own files (videos, job inputs) live under ``outputs/``, which is never served directly:
:meth:`FileGate.publish` copies one of them into Gradio's cache, and only that copy is served.
Replies show paths relative to the outputs folder, or bare file names (:func:`public_text`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

REFUSED = ("not a file uploaded to this server: upload it through the page, "
           "or pass it with gradio_client.handle_file")

# an absolute POSIX path of at least two parts, not glued to a word (so "and/or" is left alone)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"`,;:()\[\]{}<>]+/)+[^\s/'\"`,;:()\[\]{}<>]*")


class Cache(Protocol):
    """The one Gradio method the gate uses to hand a file out (any component of the app has it)."""

    def move_resource_to_block_cache(self, url_or_file_path: str | Path | None) -> str | None: ...


def payload_path(label: str, value: Any) -> str | None:
    """A file payload as a client sent it -> the path it names, or None when there is none.

    Accepts a path string, a mapping with a ``path`` key, or an object with a ``path`` attribute
    (Gradio's ``FileData``). Whether that path may be used is :meth:`FileGate.upload`'s business.
    """
    if value is None or value == "":
        return None
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        path: Any = value
    elif isinstance(value, Mapping):
        path = value.get("path")
    elif hasattr(value, "path"):
        path = value.path
    else:
        raise ValueError(f"{label}: expected an uploaded file, got {type(value).__name__}")
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise ValueError(f"{label}: expected an uploaded file, got a path of type {type(path).__name__}")
    return path


def _real(path: str) -> str | None:
    """The file a path finally names (symlinks and ``..`` resolved), or None if it names no file."""
    try:
        real = os.path.realpath(path, strict=True)
        return real if os.path.isfile(real) else None
    except (OSError, ValueError):  # missing, a loop, too long, an embedded NUL byte
        return None


class FileGate:
    """The app's single check on file references from clients, and its way of serving its own files.

    ``uploads`` returns the files Gradio received through its upload route for this app
    (``Blocks.upload_file_set``). Not the whole cache: Gradio copies into its cache whatever a
    payload with file metadata names, so a file's presence there proves nothing.
    """

    def __init__(self, outputs: Path, uploads: Callable[[], Iterable[str]]) -> None:
        self.outputs = Path(outputs).resolve()
        self._uploads = uploads
        self._published: set[str] = set()  # copies of the app's own files that it handed out

    def known(self, path: str) -> bool:
        """Whether ``path`` names an upload of this app, or a copy the app handed out."""
        real = _real(path)
        if real is None:
            return False
        # resolve the recorded names too: a request naming an upload through a symlink or ".." still
        # names that upload, and nothing else resolves into the set
        known = [*list(self._uploads()), *list(self._published)]
        return any(real == _real(p) for p in known)

    def upload(self, label: str, value: Any) -> str | None:
        """The path of an uploaded file, or None if ``value`` names none; anything else is refused."""
        path = payload_path(label, value)
        if path is None:
            return None
        if not self.known(path):
            raise ValueError(f"{label}: {REFUSED}")
        return path

    def made_here(self, path: Path) -> bool:
        """True for an existing file under the outputs folder (after resolving symlinks and ``..``)."""
        real = _real(str(path))
        return real is not None and Path(real).is_relative_to(self.outputs)

    def publish(self, cache: Cache, path: Path) -> str:
        """A servable copy of one of the app's own files (a video, a job's input image)."""
        if not self.made_here(path):
            raise ValueError(f"{Path(path).name} is gone")
        copy = cache.move_resource_to_block_cache(str(path))
        if copy is None:
            raise ValueError(f"{Path(path).name} could not be served")
        self._published.add(copy)  # a page may send it back (a job's image in the form)
        return copy

    def relative(self, path: Path | str) -> str:
        """A path as replies show it: relative to the outputs folder, else its file name."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.outputs))
        except (ValueError, OSError):
            return path.name


def public_text(text: str, outputs: Path) -> str:
    """``text`` with every absolute path replaced: relative to ``outputs`` when inside it, else its name."""
    root = Path(outputs).resolve()

    def shown(match: re.Match[str]) -> str:
        path = Path(match.group(0))
        try:
            return str(path.relative_to(root))
        except ValueError:
            return path.name or match.group(0)

    return _ABSOLUTE_PATH.sub(shown, text)


def model_names(models: Iterable[str]) -> dict[str, str]:
    """The name each model is shown by -> the model argument: a model directory by its own name,
    so the page never shows where it lives (``tiny`` stays ``tiny``)."""
    names: dict[str, str] = {}
    for model in models:
        name = Path(model).name if os.sep in model else model
        base, n = name, 2
        while name in names:  # two directories of the same name: number the later ones
            name, n = f"{base} ({n})", n + 1
        names[name] = model
    return names


# ---- requests ------------------------------------------------------------------------------------------------

_API_ROUTE = re.compile(r"/(?:call|run|api)/([^/]+)/?$")  # a named endpoint called over REST
MAX_JSON_BYTES = 8 * 2**20  # a form's JSON is a few kB; files travel through /upload, not in JSON


def file_references(data: Any) -> list[Any]:
    """The ``path`` of every object in a request's JSON that Gradio treats as a file to copy into its
    cache (``{"path": ..., "meta": {"_type": "gradio.FileData"}}``), however deeply nested.

    Other ``{"path": ...}`` objects reach the handlers as they are, and the gate checks them there.
    """
    found: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            if "path" in item and isinstance(meta, dict) and meta.get("_type") == "gradio.FileData":
                found.append(item["path"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


class FileReferenceGuard:
    """ASGI middleware: a request whose JSON names a file that is not an upload of this app (or a
    file the app handed out) is answered 400 with :data:`REFUSED`, before Gradio sees it.

    Gradio moves every file a ``{"path": ..., "meta": {"_type": "gradio.FileData"}}`` payload names
    into its cache before any handler runs. Its own check on that step answers a file outside its
    upload folder with a message quoting the path, and it accepts files other Gradio apps on the
    machine received; the guard answers first, with the gate's one message, for this app's uploads only.
    """

    def __init__(self, app: Any, gate: FileGate, file_slots: Mapping[int, Sequence[int]] | None = None,
                 arity: Mapping[int | str, int] | None = None) -> None:
        self.app = app
        self.gate = gate
        self.file_slots = file_slots or {}  # page handler (fn_index) -> positions of its file inputs
        self.arity = arity or {}  # handler (fn_index or API name) -> how many values it takes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        # every POST but an upload (multipart): FastAPI reads a body without a content type as JSON too
        if (scope.get("type") != "http" or scope.get("method") != "POST"
                or headers.get(b"content-type", b"").lower().startswith(b"multipart/")):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > MAX_JSON_BYTES:
                await _answer(send, 413, f"request too large (over {MAX_JSON_BYTES // 2**20} MB of JSON)")
                return
        body = b"".join(chunks)
        unknown = self.unknown_endpoint(scope.get("path", ""))
        if unknown is not None:
            await _answer(send, 404, unknown)
            return
        problem = self.problem(body, scope.get("path", ""))
        if problem is not None:
            await _answer(send, 400, problem)
            return
        body = self.as_file_payloads(body)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, when it comes

        await self.app(scope, replay, send)

    def unknown_endpoint(self, route: str) -> str | None:
        """A REST call to an API name the app does not have: one line (Gradio answers it with a bare
        500, which reads as a server fault). None for every other route."""
        named = _API_ROUTE.search(route)
        if named is None or not self.arity or named.group(1) in self.arity:
            return None
        known = ", ".join(sorted(f"/{k}" for k in self.arity if isinstance(k, str)))
        return f"no such endpoint; this app has {known}"

    def problem(self, body: bytes, route: str = "") -> str | None:
        """None when every file the JSON names is an upload of this app and a handler gets all its
        values; else a one-line reason."""
        try:
            data = json.loads(body)
        except ValueError:
            return None  # not JSON after all: Gradio answers that itself
        for path in file_references(data):
            if not isinstance(path, str) or not self.gate.known(path):
                return f"file: {REFUSED}"
        if isinstance(data, dict) and isinstance(data.get("data"), list) and isinstance(data.get("fn_index"), int):
            values = data["data"]
            for i in self.file_slots.get(data["fn_index"], ()):
                value = values[i] if i < len(values) else None
                # a page's file input holds nothing, an upload's object, or (rewritten below) a path
                # string, which the handler's gate checks
                if not (_file_value(value) or isinstance(value, list)):
                    return f"file: {REFUSED}"
                # a multiple-file input: a list of those, checked here (Gradio would answer a path it
                # does not serve with a validation error in several lines, before any handler runs)
                if isinstance(value, list) and not all(_file_value(v) and self._known_or_empty(v) for v in value):
                    return f"file: {REFUSED}"
        return self._too_few(data, route)

    def _known_or_empty(self, value: Any) -> bool:
        path = value.get("path") if isinstance(value, dict) else value
        return not path or self.gate.known(path)

    def _too_few(self, data: Any, route: str) -> str | None:
        """Gradio answers a call with too few values in several lines naming its own objects;
        this says it in one (gradio_client fills in the defaults itself)."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return None
        named = _API_ROUTE.search(route)
        key: int | str | None = named.group(1) if named else data.get("fn_index")
        needed = self.arity.get(key) if isinstance(key, (int, str)) else None
        if needed is None or len(data["data"]) >= needed:
            return None
        what = f"/{key}" if isinstance(key, str) else "this handler"
        values = "value" if needed == 1 else "values"
        return f"{what} takes {needed} {values}, got {len(data['data'])} (gradio_client fills in the defaults)"

    def as_file_payloads(self, body: bytes) -> bytes:
        """A page handler's file input sent as a bare path string becomes ``{"path": ...}``: Gradio
        would otherwise refuse the string with a validation error that quotes it, and the handler's
        gate answers it with the one message instead."""
        try:
            request = json.loads(body)
        except ValueError:
            return body
        if not isinstance(request, dict) or not isinstance(request.get("data"), list):
            return body
        slots = self.file_slots.get(request.get("fn_index")) if isinstance(request.get("fn_index"), int) else None
        data = request["data"]
        changed = False
        for i in slots or ():
            if i < len(data) and isinstance(data[i], str) and data[i]:
                data[i] = {"path": data[i]}
                changed = True
            elif i < len(data) and isinstance(data[i], list) and any(isinstance(v, str) and v for v in data[i]):
                data[i] = [{"path": v} if isinstance(v, str) and v else v for v in data[i]]
                changed = True
        return json.dumps(request).encode() if changed else body


def _file_value(value: Any) -> bool:
    """Whether a page's file input may hold ``value``: nothing, a path string, or an upload's object."""
    return value is None or isinstance(value, str) or (isinstance(value, dict) and isinstance(value.get("path", ""), str))


async def _answer(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message, "detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
