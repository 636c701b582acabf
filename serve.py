"""The edit web page: `python validate.py --serve` serves a page on http://127.0.0.1:7860 to upload
an image, type an instruction and watch LongCat edit it (or, on a `final`/`dev` checkpoint, generate
from text).

Standard library only (http.server; `cgi` is gone from Python 3.13, so multipart/form-data is split
by hand and its part headers read with `email`), so the toolkit gains no dependency for a demo.
validate.py loads the models once and hands over `render(prompt, ref, settings, on_step)`; this file
only turns HTTP into calls of it. The API the page uses is the one scripts use:

    POST /api/edit     multipart/form-data: image (edit), prompt, and optionally negative_prompt,
    seed,
                       steps, guidance, width, height, preview_every (default: the command line's)
                       -> PNG
    GET /api/progress  {"busy": bool, "step": int, "steps": int, "preview":
    "data:image/png;base64,…" or null}

The PNG is what `validate.py --out x.png` writes for the same inputs, byte for byte. Safe by
default: it listens on 127.0.0.1, uploads over 32 MB get 413, bad fields 400 naming the field, a
second edit while one runs 429, a failed edit 422 (or 500) with one line; never a traceback, in the
reply or on the console.
"""

from __future__ import annotations

import base64
import html
import io
import ipaddress
import json
import math
import os
import select
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from email.message import Message
from email.parser import BytesHeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

import images
import pipeline
from pipeline import Settings

MAX_UPLOAD = 32 * 2**20  # bytes; a camera's JPEG is 5-20 MB
Render = Callable[..., tuple[Image.Image, list]]


class HTTPError(Exception):
    """An answer other than 200: the status and the one-line message the client sees."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def png_bytes(image: Image.Image) -> bytes:
    """PIL's PNG with default options: what the CLI's `image.save("out.png")` writes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parse_form(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data -> {field name: (file name or None, raw bytes)}."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise HTTPError(400, "send multipart/form-data (a form with enctype=multipart/form-data)")
    # each part starts after CRLF--boundary; the first chunk is the preamble, the last starts with
    # "--"
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise HTTPError(400, "the form data is cut short (no closing boundary)")
    fields = {}
    for chunk in chunks[1:-1]:
        head, blank, value = chunk.partition(b"\r\n\r\n")
        part = BytesHeaderParser().parsebytes(head.partition(b"\r\n")[2] + b"\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        if not blank or not isinstance(name, str):
            raise HTTPError(400, "a form part has no Content-Disposition name")
        fields[name] = (part.get_filename(), value)
    return fields


def text_field(fields: dict, name: str, default: str = "") -> str:
    if name not in fields:
        return default
    try:
        return fields[name][1].decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name}: not UTF-8 text") from None


def number_field(fields: dict, name: str, kind: type, default):
    """An int or float field; empty or absent: the default. Its range is checked by the caller."""
    text = text_field(fields, name).strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise HTTPError(400, f"{name} {text[:30]!r}: not {what}") from None


def read_settings(fields: dict, base: Settings) -> Settings:
    """The form's numbers over the command line's defaults, held to pipeline.LIMITS as the command
    line's flags are."""
    width = number_field(fields, "width", int, None)
    height = number_field(fields, "height", int, None)
    if (width is None) != (height is None):
        raise HTTPError(400, "width and height: give both, or neither for the default size")
    for key, value in (("width", width), ("height", height)):
        if value is not None:
            try:
                pipeline.check_side(value, key, "page_side")
            except ValueError as e:
                raise HTTPError(400, one_line(e)) from None
    s = replace(
        base,
        size=(width, height) if width is not None else base.size,
        seed=number_field(fields, "seed", int, base.seed),
        steps=number_field(fields, "steps", int, base.steps),
        guidance=number_field(fields, "guidance", float, base.guidance),
        negative=text_field(fields, "negative_prompt", base.negative),
        preview_every=number_field(fields, "preview_every", int, base.preview_every),
    )
    try:
        s.check()
    except ValueError as e:
        raise HTTPError(400, one_line(e)) from None
    return s


class Cancelled(Exception):
    """The server is stopping: the running edit ends at its next sampler step."""


class ClientGone(Exception):
    """The client hung up mid-edit: the edit ends at its next sampler step (no one waits for it,
    and it holds the one-edit lock)."""


def hung_up(connection: socket.socket) -> bool:
    """Whether the client closed its side: the socket reads end-of-file (a peek, nothing taken)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed
        return True


def split_host(header: str) -> str:
    """The host name of a Host header, without its port ("[::1]:7860" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host header names this server by an address or a loopback name. A page on
    another site can point its own domain at 127.0.0.1 (DNS rebinding) and then reach this server
    from the browser; its requests carry that domain as Host, so names other than loopback ones and
    the machine's own are refused (the usual defence, Jackson et al. 2007, "Protecting Browsers from
    DNS Rebinding Attacks", sec. 5; Jupyter Server checks Host the same way)."""
    if not header:
        return False
    host = split_host(header)
    if host in ("localhost", socket.gethostname().lower(), bound.lower()):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name we do not know
    if address.is_loopback:
        return True
    # bound to every interface: any of this machine's addresses may be typed in
    return bound in ("0.0.0.0", "::", "")


class EditServer(ThreadingHTTPServer):
    """The HTTP server holding what every request shares: render, the defaults, the
    one-edit-at-a-time lock and the progress of the running edit.

    Its request threads are not daemons, and server_close() stops and joins them all: a daemon
    thread still in torch when Python exits (an edit cancelled by Ctrl-C unwinding its tensors)
    aborted the process ("terminate called without an active exception", rc 134)."""

    daemon_threads = False

    def __init__(self, address, render: Render, settings: Settings, flavour: str, max_upload: int):
        # first: a failed bind calls server_close() from inside super().__init__
        self.stopping = threading.Event()
        self.connections = set()  # open sockets, so that stopping can end their idle reads
        self.connections_lock = threading.Lock()
        super().__init__(address, Handler)
        self.render, self.settings, self.flavour, self.max_upload = (
            render,
            settings,
            flavour,
            max_upload,
        )
        self.page = page(settings, flavour).encode()
        self.lock = threading.Lock()
        # replaced whole, never mutated, so a poll reads a consistent snapshot without a lock
        self.progress = {"busy": False, "step": 0, "steps": 0, "preview": None}

    def on_step(self, step: int, steps: int, preview: Image.Image | None) -> None:
        if self.stopping.is_set():
            raise Cancelled()
        url = self.progress["preview"]
        if preview is not None:
            url = "data:image/png;base64," + base64.b64encode(png_bytes(preview)).decode()
        self.progress = {"busy": True, "step": step, "steps": steps, "preview": url}

    def server_close(self) -> None:
        """Stop: the running edit ends at its next sampler step, connections waiting for their
        next request (keep-alive, the page's polls) read end-of-file at once, and every request
        thread is joined before this returns."""
        self.stopping.set()
        with self.connections_lock:
            for connection in self.connections:
                try:  # reading ends, writing does not: the cancelled edit still gets its 503
                    connection.shutdown(socket.SHUT_RD)
                except OSError:  # the client is already gone
                    pass
        super().server_close()

    def handle_error(self, request, client_address: tuple) -> None:
        # a client that hangs up mid-reply is not worth a traceback
        print(f"serve: {client_address[0]}: {one_line(sys.exc_info()[1])}", file=sys.stderr)


class Handler(BaseHTTPRequestHandler):
    server: EditServer
    protocol_version = (
        "HTTP/1.1"  # keep-alive for the polls; 100-continue lets curl learn of a 413 first
    )
    timeout = 120  # seconds a stalled client may hold its thread

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def refuse_foreign_host(self) -> bool:
        """Answer 403 to a request whose Host is not this server's (see host_allowed)."""
        host = self.headers.get("Host")
        if host_allowed(host, self.server.server_address[0]):
            return False
        port = self.server.server_address[1]
        self.reply(403, f"Host {host!r} refused: open the page at http://127.0.0.1:{port}/")
        return True

    def do_GET(self) -> None:
        if self.refuse_foreign_host():
            return
        path = urlsplit(self.path).path
        if path == "/":
            self.reply(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/progress":
            self.reply(200, json.dumps(self.server.progress).encode(), "application/json")
        elif path == "/favicon.ico":  # browsers ask for it whatever the page says
            self.reply(200, ICON.encode(), "image/svg+xml")
        else:
            self.reply(404, "not found: the page is / and the API /api/edit, /api/progress")

    def do_POST(self) -> None:
        if self.refuse_foreign_host():
            return
        try:
            if urlsplit(self.path).path != "/api/edit":
                raise HTTPError(404, "not found: POST to /api/edit")
            self.reply(200, self.edit(), "image/png")
        except HTTPError as e:
            self.reply(e.status, e.message)
        except Cancelled:
            self.reply(503, "the server is stopping; the edit was cancelled")
        except ClientGone:
            self.log_message("%s", "the client hung up: its edit stopped")
            self.close_connection = True
        except TimeoutError:  # a client that stalls mid-upload for `timeout` seconds
            self.log_message("%s", f"the upload stalled for {self.timeout} s: dropped")
            self.close_connection = True
        except Exception as e:  # a bug answers 500 and leaves the server running
            self.log_error("%s", f"internal error: {type(e).__name__}: {one_line(e)}")
            self.reply(500, f"internal error: {type(e).__name__}: {one_line(e)}")

    def edit(self) -> bytes:
        origin = self.headers.get("Origin")
        cross_site = self.headers.get("Sec-Fetch-Site") == "cross-site"
        if cross_site or (origin and urlsplit(origin).netloc != self.headers.get("Host")):
            sender = origin or "another site"  # Sec-Fetch-Site said so, with no Origin
            raise HTTPError(
                403, f"requests from {sender} are refused: use the page this server serves"
            )
        fields = parse_form(self.read_body(), self.headers.get("Content-Type", ""))
        prompt = text_field(fields, "prompt")
        if not prompt.strip():
            raise HTTPError(400, "prompt: required (the instruction)")
        s = read_settings(fields, self.server.settings)
        name, raw = fields.get("image", (None, b""))
        if self.server.flavour == "t2i" and raw:
            raise HTTPError(400, "image: this is a text-to-image checkpoint; it takes no image")
        if self.server.flavour == "edit" and not raw:
            # also a must: load_rgb reads `path` from disk when data is empty
            raise HTTPError(400, "image: required (the image to edit)")
        warnings = []  # what the pipeline warns about, for the page and the reply's headers
        if not self.server.lock.acquire(blocking=False):
            raise HTTPError(429, "busy with another edit; try again when it is done")
        try:
            try:  # decoded under the lock: one 64 MP image in memory at a time
                ref = None
                if raw:
                    upload = Path(Path(name or "upload").name)
                    ref = images.load_rgb(upload, data=raw, key="image")
            except images.ImageError as e:
                raise HTTPError(400, one_line(e)) from None
            self.server.progress = {"busy": True, "step": 0, "steps": s.steps, "preview": None}

            def on_step(step: int, steps: int, preview: Image.Image | None) -> None:
                self.server.on_step(step, steps, preview)  # first: a stop says Cancelled
                if hung_up(self.connection):
                    raise ClientGone()

            try:
                image, _ = self.server.render(
                    prompt,
                    ref,
                    s,
                    on_step=on_step,
                    progress=False,
                    on_warning=warnings.append,
                )
            # the pipeline's own errors (OutOfMemory, a non-finite result) are one-line ValueErrors
            except ValueError as e:
                raise HTTPError(422, one_line(e)) from None
        finally:
            # the page polls progress: it also shows what the pipeline warned about
            self.server.progress = {**self.server.progress, "busy": False, "warnings": warnings}
            self.server.lock.release()
        self.warnings = warnings  # and a script reads them from the reply's headers
        w, h = image.size
        self.log_message("%s", f"{w}x{h}, {s.steps} steps, seed {s.seed}: {prompt[:60]!r}")
        return png_bytes(image)

    def content_length(self) -> int:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "Content-Length: required (a number)") from None
        if length < 0:
            raise HTTPError(400, f"Content-Length {length}: negative")
        return length

    def handle_expect_100(self) -> bool:
        try:
            if self.content_length() > self.server.max_upload:
                raise HTTPError(413, f"the upload is over {self.server.max_upload / 2**20:g} MB")
        except HTTPError as e:
            self.reply(e.status, e.message)
            return False
        return super().handle_expect_100()

    def read_body(self) -> bytes:
        length = self.content_length()
        if length > self.server.max_upload:
            # read (and drop) what the client is sending anyway, so it sees the 413 and not a reset
            left = min(length, 4 * self.server.max_upload)
            while left > 0 and (got := len(self.rfile.read(min(left, 2**20)))):
                left -= got
            raise HTTPError(413, f"the upload is over {self.server.max_upload / 2**20:g} MB")
        body = self.rfile.read(length)
        if len(body) < length:
            raise HTTPError(400, "the upload was cut short")
        return body

    def reply(
        self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        body = (body + "\n").encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        warnings = getattr(self, "warnings", [])
        for message in warnings:  # HTTP headers are Latin-1: ASCII only
            self.send_header(
                "X-Minicat-Warning", one_line(message).encode("ascii", "replace").decode()
            )
        if warnings:  # all of them in one header the page parses (fetch joins repeats with ", ")
            self.send_header(WARNINGS_HEADER, json.dumps([one_line(m) for m in warnings]))
        self.warnings = []
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status >= 400:  # part of the body may be unread: start afresh on a new connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-") -> None:
        # the page polls twice a second; a malformed request line has no path at all
        if not getattr(self, "path", "").startswith("/api/progress"):
            super().log_request(code, size)


def make_server(
    render: Render,
    settings: Settings,
    flavour: str = "edit",
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload: int = MAX_UPLOAD,
) -> EditServer:
    """The server, bound and not yet serving (port 0: a free port, see .server_address)."""
    assert flavour in ("edit", "t2i"), flavour
    try:
        return EditServer((host, port), render, settings, flavour, max_upload)
    except OSError as e:  # the port is taken, the name unknown, the address not this machine's
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror or e}): choose "
            "another --port, or a --host of this machine"
        ) from None


def serve(
    render: Render,
    settings: Settings,
    flavour: str = "edit",
    host: str = "127.0.0.1",
    port: int = 7860,
) -> None:
    """Serve the page until Ctrl-C."""
    server = make_server(render, settings, flavour, host, port)
    try:
        url = f"http://{host}:{server.server_address[1]}/"
        where = (
            ""
            if host in ("127.0.0.1", "localhost")
            else " (no login: anyone who reaches it can use it)"
        )
        print(f"serving the {flavour} page on {url}{where}; Ctrl-C stops", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        if server.lock.locked():
            print("stopping: the running edit ends at its next step", flush=True)
        try:
            server.server_close()  # waits for the edit and every other request
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, without Python's shutdown
            print("stopped without waiting for the running edit", flush=True)
            os._exit(130)
        print("stopped")
    finally:
        server.server_close()  # a second call only joins threads that have already ended


# --------------------------------------------------------------------------------------------------
# The page: one file, no external assets; {{KEY}} marks what page() fills in.


WARNINGS_HEADER = (
    "X-Minicat-Warnings"  # a JSON list (ASCII: json escapes the rest); the page shows it
)


def page(s: Settings, flavour: str) -> str:
    edit = flavour == "edit"
    image_field = (
        '<label>Image to edit<input name="image" type="file" accept="image/*" required>'
        '<img id="source" alt=""></label>'
    )
    width, height = s.size or ("", "")
    values = {
        "TITLE": "LongCat-Image-Edit" if edit else "LongCat-Image (text to image)",
        "IMAGE_FIELD": image_field if edit else "",
        "PROMPT_LABEL": "Instruction" if edit else "Prompt",
        "ACTION": "Edit" if edit else "Generate",
        "FLAVOUR": flavour,
        "WARNINGS_HEADER": WARNINGS_HEADER,
        "AUTO": "about 1 MP at the image's aspect" if edit else "1024",
        "NEGATIVE": html.escape(s.negative),
        "SEED": str(s.seed),
        "STEPS": str(s.steps),
        "GUIDANCE": f"{s.guidance:g}",
        "WIDTH": str(width),
        "HEIGHT": str(height),
        "PREVIEW": str(
            s.preview_every or max(1, math.ceil(s.steps / 8))
        ),  # previews by default on the page
    }
    out = PAGE
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", value)
    return out


# The page's icon: a rounded square in the header's colour with an "m", as SVG (no file to ship).
ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" '
    'rx="3" fill="#22252b"/><text x="8" y="12" font-size="11" text-anchor="middle" fill="#fff" '
    'font-family="sans-serif">m</text></svg>'
)
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>minicat: {{TITLE}}</title>
<link rel="icon" href="/favicon.ico" type="image/svg+xml">
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:0;background:#f3f3f5;color:#222}
header{padding:12px 20px;background:#22252b;color:#fff}header span{opacity:.7;margin-left:10px}
main{display:grid;grid-template-columns:minmax(280px,360px) 1fr;gap:20px;padding:20px}
form,.card,#status{background:#fff;padding:14px;border-radius:8px;box-shadow:0 1px 3px #0002}
form{align-self:start}label{display:block;margin:0 0 10px;font-size:13px;color:#555}
input,textarea,button{font:inherit;width:100%;box-sizing:border-box;margin-top:3px}
input,textarea{padding:6px;border:1px solid #ccc;border-radius:4px}
.row{display:grid;grid-template-columns:1fr 1fr 1fr;gap:8px}
button{padding:10px;border:0;border-radius:6px;background:#3867d6;color:#fff;font-weight:600;
cursor:pointer}
button:disabled{background:#999;cursor:wait}#error{color:#b00020;white-space:pre-wrap;margin-top:10px}
#source{display:none;max-width:100%;max-height:180px;margin-top:6px}
#status{display:none;margin-bottom:16px}progress{width:100%}#preview{display:none;margin-top:8px}
.card{margin-bottom:16px;display:flex;gap:12px;align-items:flex-start;flex-wrap:wrap}
.card img,#preview{max-width:100%;max-height:70vh}.card .thumb{max-width:160px}
.meta{font-size:13px;color:#555;flex-basis:100%}.warn{font-size:13px;color:#9a5b00;flex-basis:100%}
#results:empty::before{content:"Results appear here, newest first.";color:#888}
section{min-width:0}
@media (max-width:700px){main{grid-template-columns:1fr;padding:10px;gap:12px}
.row{grid-template-columns:1fr 1fr}.card .thumb{max-width:40%}}
</style></head>
<body><header><b>minicat</b><span>{{TITLE}}</span></header>
<main><form id="form">{{IMAGE_FIELD}}
<label>{{PROMPT_LABEL}}<textarea name="prompt" rows="3" required></textarea></label>
<label>Negative prompt<input name="negative_prompt" value="{{NEGATIVE}}"></label>
<div class="row"><label>Seed<input name="seed" type="number" min="0" value="{{SEED}}"></label>
<label>Steps<input name="steps" type="number" min="1" max="1000" value="{{STEPS}}"></label>
<label>Guidance<input name="guidance" type="number" min="0" max="100" step="any" value="{{GUIDANCE}}">
</label></div>
<div class="row"><label>Width<input name="width" type="number" min="16" max="4096" step="16"
 value="{{WIDTH}}"
 placeholder="auto" title="empty: {{AUTO}}"></label>
<label>Height<input name="height" type="number" min="16" max="4096" step="16" value="{{HEIGHT}}"
 placeholder="auto" title="empty: {{AUTO}}"></label>
<label>Preview every<input name="preview_every" type="number" min="0" max="1000" value="{{PREVIEW}}"
 title="decode the image every N steps (0: never)"></label></div>
<button id="go">{{ACTION}}</button><div id="error"></div></form>
<section><div id="status"><div id="count">starting</div><progress id="bar"></progress>
<img id="preview" alt=""></div>
<div id="results"></div></section></main>
<script>
function $(id) { return document.getElementById(id); }
const form = $("form"), image = form.elements.image;
if (image) image.onchange = function () {
  const file = image.files[0];
  $("source").style.display = file ? "block" : "none";
  if (file) $("source").src = URL.createObjectURL(file);
};
async function poll() {
  try {
    const p = await (await fetch("/api/progress")).json();
    if (!p.busy) return;
    $("count").textContent = p.step ? `step ${p.step} / ${p.steps}` : "encoding the prompt";
    $("bar").max = p.steps; $("bar").value = p.step;
    if (p.preview) { $("preview").src = p.preview; $("preview").style.display = "block"; }
  } catch (e) {}  // the next poll tries again
}
function addResult(blob, fields, seconds, warnings) {
  const url = URL.createObjectURL(blob), card = document.createElement("div"), img = new Image();
  const meta = document.createElement("div"), n = $("results").children.length + 1;
  card.className = "card"; meta.className = "meta"; img.src = url;
  const source = fields.get("image");
  if (source && source.size) {
    const thumb = new Image(); thumb.className = "thumb"; thumb.src = URL.createObjectURL(source);
    card.append(thumb);
  }
  img.onload = function () {
    const seed = fields.get("seed") || "default", link = document.createElement("a");
    meta.textContent = `#${n} · ${img.naturalWidth}x${img.naturalHeight} · seed ${seed} · `
      + `${fields.get("steps")} steps · guidance ${fields.get("guidance")} · `
      + `${seconds.toFixed(1)} s · `
      + `"${fields.get("prompt")}" `;
    link.href = url; link.download = `{{FLAVOUR}}-${n}-seed${seed}.png`; link.textContent = "download";
    meta.append(link);
  };
  card.append(img, meta);
  for (const text of warnings) {  // a prompt cut at 512 tokens, a stretched reference
    const line = document.createElement("div"); line.className = "warn";
    line.textContent = `warning: ${text}`; card.append(line);
  }
  $("results").prepend(card);
}
form.onsubmit = async function (event) {
  event.preventDefault();
  const fields = new FormData(form), started = performance.now();
  $("go").disabled = true; $("error").textContent = ""; $("count").textContent = "starting";
  $("bar").removeAttribute("value"); $("preview").style.display = "none";
  $("status").style.display = "block";
  const timer = setInterval(poll, 500);
  try {
    const reply = await fetch("/api/edit", {method: "POST", body: fields});
    if (!reply.ok) throw new Error(`${reply.status}: ${(await reply.text()).trim()}`);
    const warnings = JSON.parse(reply.headers.get("{{WARNINGS_HEADER}}") || "[]");
    addResult(await reply.blob(), fields, (performance.now() - started) / 1000, warnings);
  } catch (e) {
    $("error").textContent = e.message;
  } finally {
    clearInterval(timer); $("go").disabled = false; $("status").style.display = "none";
  }
};
</script></body></html>
"""
