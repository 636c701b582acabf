"""The web page where users meet serve.py: it fits a phone and has an icon. No headless browser
here, so the CSS is read: what would overflow a 360-px-wide screen is a track or a width wider
than it outside a narrow-screen media query."""

import re
import threading
import urllib.request

import pipeline
import serve


def fake_render(prompt, ref, s, on_step=None, progress=True):
    raise AssertionError("the page tests generate nothing")


def get(server, path: str) -> tuple[int, str, bytes]:
    host, port = server.server_address[:2]
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as r:
        return r.status, r.headers["Content-Type"], r.read()


def test_favicon_is_an_icon_not_a_404():
    """Catches /favicon.ico falling through to the 404 branch."""
    server = serve.make_server(fake_render, pipeline.Settings(size=(32, 32)), "edit", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, content_type, body = get(server, "/favicon.ico")
        assert status == 200 and content_type == "image/svg+xml", (status, content_type)
        assert body.startswith(b"<svg") and body.rstrip().endswith(b"</svg>"), body[:80]
        assert b'rel="icon" href="/favicon.ico"' in get(server, "/")[2]
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_has_one_column_on_a_phone():
    """At 360 px the form's 280-px track beside the results overflows; under 700 px the page is one
    column. Catches the media query dropped or a fixed width wider than a phone."""
    css = serve.PAGE.split("<style>")[1].split("</style>")[0]
    wide, narrow = css.split("@media (max-width:700px)")
    assert "main{grid-template-columns:1fr;" in narrow.replace(" ", ""), narrow
    widths = [int(n) for n in re.findall(r"(?<![-\w])(?:min-|max-)?width:(\d+)px", wide)]
    assert all(w <= 360 for w in widths), widths
    assert "section{min-width:0}" in wide  # a grid item may shrink below its content's width
