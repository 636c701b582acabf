"""The edit web page (serve.py): a real server on a free port around the tiny checkpoint, driven
with urllib as a script would; the PNG it sends is the one validate.py writes."""

import base64
import functools
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, validate_cli
from PIL import Image

import pipeline
import serve

PROMPT = "make the 'sky' purple"


def form(**fields) -> tuple[bytes, str]:
    """multipart/form-data by hand: bytes values are files, the rest text."""
    boundary = "----minicat-test-7d1a"
    body = b""
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"'
        if isinstance(value, bytes):
            head = f'Content-Disposition: {disposition}; filename="{name}.png"'
            head += "\r\nContent-Type: image/png"
        else:
            head, value = f"Content-Disposition: {disposition}", str(value).encode()
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(server, path: str, body: bytes | None = None, headers=None) -> tuple[int, str, bytes]:
    """(status, content type, body) for a GET (body None) or a POST; errors are answers, not
    exceptions."""
    host, port = server.server_address[:2]
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def post(server, **fields) -> tuple[int, str, bytes]:
    body, content_type = form(**fields)
    return request(server, "/api/edit", body, {"Content-Type": content_type})


def get_progress(server) -> dict:
    status, content_type, body = request(server, "/api/progress")
    assert status == 200 and content_type == "application/json", (status, content_type)
    return json.loads(body)


@contextmanager
def running(render, settings, flavour="edit", **kw):
    server = serve.make_server(render, settings, flavour, port=0, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def png(size=(64, 48), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def fake_render(prompt, ref, s, on_step=None, progress=True, on_warning=None):
    """Stands in for the pipeline where only the HTTP side is under test."""
    return Image.new("RGB", s.size or (32, 32), (0, 128, 255)), []


@pytest.fixture(scope="module")
def models(tiny_edit):
    return pipeline.Models(tiny_edit, "cpu", torch.float32, pipeline.LoadOptions(), keep=True)


@pytest.fixture(scope="module")
def server(models):
    with running(
        functools.partial(pipeline.render, models), pipeline.Settings(size=None, steps=2)
    ) as s:
        yield s


def test_page_has_the_form(server):
    status, content_type, body = request(server, "/")
    page = body.decode()
    assert status == 200 and content_type.startswith("text/html"), (status, content_type)
    for name in (
        "image",
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
    ):
        assert f'name="{name}"' in page, name
    assert (
        ">Edit</button>" in page and 'value="2"' in page
    )  # the steps default comes from the settings
    assert "http://" not in page and "https://" not in page  # no external assets


def test_t2i_page_has_no_image_field_and_generates(tiny_t2i):
    models = pipeline.Models(tiny_t2i, "cpu", torch.float32, pipeline.LoadOptions(), keep=True)
    with running(
        functools.partial(pipeline.render, models), pipeline.Settings(steps=1), "t2i"
    ) as server:
        page = request(server, "/")[2].decode()
        assert (
            'name="image"' not in page and 'name="prompt"' in page and ">Generate</button>" in page
        )
        status, content_type, body = post(server, prompt="a cat", width=32, height=48, guidance=1)
        assert status == 200 and content_type == "image/png", body[:200]
        assert Image.open(io.BytesIO(body)).size == (32, 48)
        status, _, body = post(server, prompt="a cat", image=png())
        assert status == 400 and b"image" in body, body


def test_edit_returns_a_png_of_the_asked_size(server):
    status, content_type, body = post(
        server, image=png(), prompt=PROMPT, width=128, height=96, guidance=1
    )  # the upload's 4:3 (another aspect keeps the upload's, with a warning: below)
    assert status == 200 and content_type == "image/png", body[:300]
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.size == (128, 96), (image.format, image.size)


def test_same_seed_same_bytes_as_the_cli(server, tiny_edit, tmp_path):
    ref = tmp_path / "ref.png"
    ref.write_bytes(png((80, 64), (30, 160, 90)))
    fields = dict(image=ref.read_bytes(), prompt=PROMPT, seed=7, width=64, height=48, guidance=1)
    first, second = post(server, **fields), post(server, **fields)
    assert first[0] == 200 and first[2] == second[2], "the same seed gave different bytes"
    assert post(server, **{**fields, "seed": 8})[2] != first[2], "the seed is ignored"
    out = tmp_path / "cli.png"
    validate_cli(
        model=tiny_edit,
        ref=ref,
        prompt=PROMPT,
        steps=2,
        seed=7,
        guidance=1,
        resolution="64x48",
        out=out,
    )
    assert out.read_bytes() == first[2], "the page's PNG differs from validate.py's"


def test_a_non_image_upload_is_a_400(server):
    status, content_type, body = post(server, image=b"GIF89a but not really", prompt=PROMPT)
    assert status == 400 and content_type.startswith("text/plain"), (status, body)
    assert b"image" in body and b"cannot read image" in body and b"Traceback" not in body, body


def test_too_many_pixels_is_a_400(server):
    """A PNG header claiming 8500x8500 (72 MP) is refused before anything is decoded."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", 8500, 8500, 8, 2, 0, 0, 0)
    huge = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    status, _, body = post(server, image=huge, prompt=PROMPT)
    assert status == 400 and b"MP" in body and b"Traceback" not in body, (status, body)


def test_a_too_large_upload_is_a_413(server):
    status, _, body = post(server, image=b"\0" * (serve.MAX_UPLOAD + 1), prompt=PROMPT)
    assert status == 413 and b"32 MB" in body, (status, body)


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("steps", 1001),
        ("steps", "two"),
        ("seed", -1),
        ("guidance", "nan"),
        ("guidance", "inf"),
        ("width", 100),
        ("width", 8192),
        ("height", 0),
        ("preview_every", -1),
    ],
)
def test_a_bad_number_is_a_400_naming_the_field(server, field, value):
    fields = dict(image=png(), prompt=PROMPT, width=64, height=48)
    status, _, body = post(server, **{**fields, field: value})
    assert status == 400 and body.decode().startswith(field), (status, body)


@pytest.mark.parametrize("missing", ["prompt", "image"])
def test_a_missing_field_is_a_400(server, missing):
    fields = dict(image=png(), prompt=PROMPT)
    del fields[missing]
    status, _, body = post(server, **fields)
    assert status == 400 and body.decode().startswith(missing), (status, body)


def test_a_second_request_while_one_runs_is_a_429():
    started, release = threading.Event(), threading.Event()

    def slow_render(prompt, ref, s, on_step=None, progress=True, on_warning=None):
        started.set()
        assert release.wait(30)
        return fake_render(prompt, ref, s)

    with running(slow_render, pipeline.Settings(size=(32, 32), steps=2)) as server:
        first = []
        thread = threading.Thread(
            target=lambda: first.append(post(server, image=png(), prompt=PROMPT))
        )
        thread.start()
        assert started.wait(30)
        status, _, body = post(server, image=png(), prompt=PROMPT)
        release.set()
        thread.join(30)
        assert status == 429 and b"busy" in body, (status, body)
        assert first[0][0] == 200, first
        assert post(server, image=png(), prompt=PROMPT)[0] == 200  # the lock was released


def test_progress_counts_the_steps_and_shows_previews(models):
    seen = []
    render = functools.partial(pipeline.render, models)

    def spying_render(prompt, ref, s, on_step=None, progress=True, on_warning=None):
        def spy(step, steps, preview):
            on_step(step, steps, preview)
            seen.append(get_progress(server))

        return render(prompt, ref, s, spy, progress)

    with running(spying_render, pipeline.Settings(size=None, steps=3, guidance=1)) as server:
        assert get_progress(server) == {"busy": False, "step": 0, "steps": 0, "preview": None}
        status, _, body = post(
            server, image=png(), prompt=PROMPT, width=64, height=48, preview_every=1
        )
        assert status == 200, body
        steps = [(p["busy"], p["step"], p["steps"]) for p in seen]
        assert steps == [(True, 1, 3), (True, 2, 3), (True, 3, 3)], steps
        # previews every step but the last (that one is the result)
        assert all(p["preview"].startswith("data:image/png;base64,") for p in seen)
        preview = Image.open(io.BytesIO(base64.b64decode(seen[1]["preview"].split(",", 1)[1])))
        assert preview.size == (64, 48)
        after = get_progress(server)
        assert after["busy"] is False and after["step"] == after["steps"] == 3, after


OOM = "out of GPU memory while sampling 64x48; lower it with --quant int8"


def test_a_failed_generation_is_one_line_and_the_server_carries_on(capfd):
    def failing_render(prompt, ref, s, on_step=None, progress=True, on_warning=None):
        if prompt == "bug":
            raise RuntimeError("something deep\nbroke")
        raise pipeline.OutOfMemory(OOM)

    with running(failing_render, pipeline.Settings(size=(32, 32), steps=2)) as server:
        status, _, body = post(server, image=png(), prompt=PROMPT)
        assert status == 422 and body == (OOM + "\n").encode(), body
        status, _, body = post(server, image=png(), prompt="bug")
        assert status == 500 and body == b"internal error: RuntimeError: something deep broke\n", (
            body
        )
        assert get_progress(server)["busy"] is False
    assert "Traceback" not in capfd.readouterr().err


def test_a_post_from_another_site_is_refused(server):
    body, content_type = form(image=png(), prompt=PROMPT)
    headers = {"Content-Type": content_type, "Origin": "http://evil.example"}
    status, _, reply = request(server, "/api/edit", body, headers)
    assert status == 403 and b"evil.example" in reply, (status, reply)


def test_the_default_host_is_loopback(monkeypatch, capsys):
    server = serve.make_server(fake_render, pipeline.Settings(), port=0)
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()
    # serve() prints the URL and takes Ctrl-C as the normal way to stop
    monkeypatch.setattr(serve.EditServer, "serve_forever", serve_forever_interrupted)
    serve.serve(fake_render, pipeline.Settings(), port=0)
    out = capsys.readouterr().out
    assert "http://127.0.0.1:" in out and "stopped" in out, out


def serve_forever_interrupted(self, poll_interval=0.5):
    raise KeyboardInterrupt


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7860", "127.0.0.1.nip.io"])
def test_a_foreign_host_name_is_refused_for_every_request(server, host):
    """DNS rebinding: a site whose name resolves to 127.0.0.1 reaches the server with its own name
    as Host; neither the page, the progress (its previews) nor the API answer it."""
    port = server.server_address[1]
    for path, body in (("/", None), ("/api/progress", None), ("/api/edit", form(prompt=PROMPT))):
        data = body[0] if body else None
        headers = {"Host": host}
        if body:
            headers["Content-Type"] = body[1]
        status, _, reply = request(server, path, data, headers)
        assert status == 403 and f"http://127.0.0.1:{port}/".encode() in reply, (
            path,
            status,
            reply,
        )
    for good in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert request(server, "/", None, {"Host": good})[0] == 200, good


def test_a_cross_site_fetch_is_refused_even_without_an_origin(server):
    body, content_type = form(image=png(), prompt=PROMPT)
    headers = {"Content-Type": content_type, "Sec-Fetch-Site": "cross-site"}
    status, _, reply = request(server, "/api/edit", body, headers)
    assert status == 403 and b"requests from another site are refused" in reply, (status, reply)


def slow_render(prompt, ref, s, on_step=None, progress=True, on_warning=None):
    """A render that samples for minutes unless on_step stops it."""
    for step in range(1, 10_000):
        on_step(step, 10_000, None)
        time.sleep(0.01)
    return Image.new("RGB", (32, 32)), []


def test_closing_the_server_cancels_the_edit_and_joins_every_request_thread():
    """A request thread still in torch when Python exits aborted the process on Ctrl-C (rc 134):
    server_close() ends the running edit at its next step, ends idle keep-alive connections at
    once (not after the 120 s socket timeout) and returns only when no request thread is left."""
    server = serve.make_server(slow_render, pipeline.Settings(size=(32, 32)), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    idle = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    idle.request("GET", "/api/progress")  # a poll on a kept-alive connection, as a browser does
    assert idle.getresponse().read()
    answer = {}
    client = threading.Thread(
        target=lambda: answer.update(status=post(server, image=png(), prompt=PROMPT)[0])
    )
    client.start()
    deadline = time.time() + 30
    while get_progress(server)["step"] < 1:
        assert time.time() < deadline, "the edit never started"
        time.sleep(0.02)
    server.shutdown()
    start = time.time()
    server.server_close()
    took = time.time() - start
    alive = [t.name for t in threading.enumerate() if "process_request" in t.name]
    client.join(timeout=30)
    idle.close()
    assert not alive, alive
    assert took < 20, f"server_close took {took:.0f} s"
    assert answer == {"status": 503}, answer


def test_a_client_that_hangs_up_mid_edit_stops_it_and_frees_the_server(capsys):
    """The browser tab closed while the sampler runs: the edit stops at its next step and the
    lock is free for the next user, with one plain line on the console. Catches the edit running
    on for nobody (others get 429 meanwhile) and its "internal error" lines."""
    server = serve.make_server(slow_render, pipeline.Settings(size=(32, 32)), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body, content_type = form(image=png(), prompt=PROMPT)
        head = f"POST /api/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        client = socket.create_connection(server.server_address[:2], timeout=30)
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while get_progress(server)["step"] < 2:
            assert time.time() < deadline, "the edit never started"
            time.sleep(0.02)
        client.close()
        while get_progress(server)["busy"]:  # slow_render would take 100 s on its own
            assert time.time() < deadline, "the edit ran on after its client hung up"
            time.sleep(0.02)
        assert not server.lock.locked()
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "the client hung up: its edit stopped" in err and "internal error" not in err, err


@pytest.mark.parametrize("when", ["before sampling", "while sampling"])
def test_ctrl_c_during_an_edit_stops_cleanly(tiny_edit, when):
    """SIGINT while an edit runs: the edit is cancelled at its next step, the process says it
    stopped and exits by itself (it used to abort in about half the tries: rc 134, 'terminate
    called without an active exception')."""
    port = free_port()
    cmd = [sys.executable, ROOT / "validate.py", "--serve", "--model", tiny_edit]
    cmd += ["--port", str(port), "--device", "cpu"]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # an abort shows the threads' stacks
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_port(port, proc)
        body, content_type = form(image=png((256, 256)), prompt=PROMPT, steps=400)
        url = f"http://127.0.0.1:{port}/api/edit"
        req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
        answer = {}

        def send() -> None:
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer["status"] = r.status
            except urllib.error.HTTPError as e:
                answer["status"] = e.code
            except OSError as e:
                answer["error"] = e

        thread = threading.Thread(target=send)
        thread.start()
        deadline = time.time() + 120
        while True:  # wait until the edit holds the server (and, for one case, samples)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/progress", timeout=10) as r:
                progress = json.loads(r.read())
            if progress["busy"] and (when == "before sampling" or progress["step"] >= 1):
                break
            assert time.time() < deadline, f"the edit never started: {progress}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        thread.join(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, (proc.returncode, err[-2000:])
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    assert "stopped" in out, out
    assert answer.get("status") == 503 or "error" in answer, answer


def test_the_reply_carries_every_warning_in_the_header_the_page_reads(server):
    """A prompt past 512 tokens and a size that would stretch the upload: both warnings, as one
    JSON list in the header the page's script parses (and shows in the result's card). Catches the
    page reading nothing (the warnings only in /api/progress, which the page never looks at)."""
    body, content_type = form(
        image=png(), prompt=PROMPT + " and" * 600, steps=1, width=16, height=256
    )
    host, port = server.server_address[:2]
    req = urllib.request.Request(
        f"http://{host}:{port}/api/edit", data=body, headers={"Content-Type": content_type}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        warnings = json.loads(r.headers[serve.WARNINGS_HEADER])
        assert Image.open(io.BytesIO(r.read())).size == (80, 64)  # 64x48's aspect at 16 x 256
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("16x256 would stretch the reference (64x48)"), warnings
    assert "only the first 512 are used" in warnings[1], warnings
    page = request(server, "/")[2].decode()
    assert f'JSON.parse(reply.headers.get("{serve.WARNINGS_HEADER}")' in page
    assert 'line.className = "warn"' in page and "card.append(line)" in page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port} after {seconds} s")


def test_a_prompt_past_512_tokens_is_cut_with_a_warning_the_page_shows(server):
    """The pipelines keep 512 prompt tokens; the rest used to vanish without a word."""
    long = PROMPT + " and" * 600
    status, _, _ = post(server, image=png(), prompt=long, steps=1)
    assert status == 200
    warnings = get_progress(server)["warnings"]
    assert len(warnings) == 1 and "only the first 512 are used" in warnings[0], warnings
    post(server, image=png(), prompt=PROMPT, steps=1)
    assert get_progress(server)["warnings"] == []  # a short prompt: no warning


def test_a_port_in_use_or_an_unknown_host_is_one_line():
    """Catches the AttributeError a failed bind raised (server_close ran inside __init__, before
    the server had its stop event), hiding the real error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port}: cannot listen there .*in use"):
            serve.make_server(None, pipeline.Settings(), port=port)
    with pytest.raises(ValueError, match="--host no-such-host.invalid --port 0: cannot listen"):
        serve.make_server(None, pipeline.Settings(), host="no-such-host.invalid", port=0)


def test_a_malformed_request_line_gets_an_answer(server, capsys):
    """Garbage instead of a request line, and a 70,000-character path: each gets the standard
    error reply (400, 414). Catches the logger reading a path that was never set (no reply at
    all, an AttributeError on the console)."""
    host, port = server.server_address[:2]
    for line in (b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, port), timeout=30) as c:
            c.sendall(line)
            answer = b""
            while chunk := c.recv(4000):  # the server closes after an error
                answer += chunk
        # garbage gets the error page alone (HTTP/0.9 style), the long path a 414 with its head
        assert b"Error code: 400" in answer or b"Error code: 414" in answer, answer
    assert "has no attribute" not in capsys.readouterr().err
