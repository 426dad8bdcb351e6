"""The web page: ``GET /`` serves it, ``/assets/*`` its bundle, ``GET /info`` what it needs to know, and
``GET /opensearch.xml`` the OpenSearch description a browser reads to add it as a search engine
(``/?q={searchTerms}``: the page asks the question on arrival).

The page is built at install time (``api/web``, bundled by esbuild into ``api/web/dist``; ``make run``
and ``make test`` build it) and served from this process: no CDN, no font or script from elsewhere,
so it works on a network without internet access. The page and its assets hold no data, so they need
no API key; the page asks for one when ``/info`` says keys are required and sends it on every call.

Every page response carries a Content-Security-Policy that allows only this origin's script and
style and no inline script: page titles, snippets and model output are rendered sanitised
(``api/web/src/answer.js``), and should anything slip through, the browser still refuses to run it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from api.engine_state import SetupHint
from api.routes.deps import services

WEB_DIST = Path(__file__).resolve().parent.parent / "web" / "dist"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a conversation's URL never leaks to the sources it links
    "Cache-Control": "no-cache",  # revalidate: a rebuilt bundle is seen at once (ETag makes it cheap)
}
NOT_BUILT = (
    "<!doctype html><title>megrez-search</title><p>The web page is not built. Run <code>make run</code>, or "
    "<code>npm --prefix api/web ci &amp;&amp; npm --prefix api/web run build</code>. The API works without it: "
    "see <a href='/docs'>/docs</a>."
)

OPENSEARCH_TYPE = "application/opensearchdescription+xml"
OPENSEARCH = """<?xml version="1.0" encoding="UTF-8"?>
<OpenSearchDescription xmlns="http://a9.com/-/spec/opensearch/1.1/"
                       xmlns:moz="http://www.mozilla.org/2006/browser/search/">
  <ShortName>megrez-search</ShortName>
  <Description>Answers written from web sources, every citation linked to its passage</Description>
  <InputEncoding>UTF-8</InputEncoding>
  <Url type="text/html" method="get" template={search}/>
  <Url type="application/opensearchdescription+xml" rel="self" template={self}/>
  <moz:SearchForm>{home}</moz:SearchForm>
</OpenSearchDescription>
"""

router = APIRouter(tags=["web"])


class _Assets(StaticFiles):
    """The bundle, with the page's headers."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


def mount_assets(app, dist: Path = WEB_DIST) -> None:
    """Serve ``dist/assets`` at ``/assets`` (checked per request, so a page built after start is served)."""
    app.mount("/assets", _Assets(directory=dist / "assets", check_dir=False), name="assets")


@router.get("/", include_in_schema=False, response_model=None)
async def page() -> FileResponse | HTMLResponse:
    index = WEB_DIST / "index.html"
    if not index.is_file():
        return HTMLResponse(NOT_BUILT, status_code=503, headers=PAGE_HEADERS)
    return FileResponse(index, headers=PAGE_HEADERS)


@router.get("/opensearch.xml", include_in_schema=False, response_class=Response)
async def opensearch(request: Request) -> Response:
    """The OpenSearch description of this service (linked from the page with ``<link rel="search">``), so a
    browser can add it as a search engine: a search opens ``/?q=<terms>``. The addresses are absolute, built
    from the address the request came to (behind a proxy, run uvicorn with ``--proxy-headers``)."""
    home = str(request.url_for("page"))
    body = OPENSEARCH.format(
        search=quoteattr(f"{home}?q={{searchTerms}}"),
        self=quoteattr(str(request.url_for("opensearch"))),
        home=escape(home),
    )
    return Response(body, media_type=OPENSEARCH_TYPE, headers=PAGE_HEADERS)


@router.get("/info")
async def info(request: Request) -> dict:
    """What a client needs before it asks: whether a key is needed, whether the model is ready (``engine``:
    ``loading``, ``ready`` or ``unavailable``), what to set up before the service works fully (``setup``:
    ``{code, params}`` hints, ``api/engine_state.py``), what it reads besides text, and the request limits.
    Without a valid key (when keys are required) only ``keys_required`` is told; what is wrong with the engine
    (``engine_detail``: server addresses, library errors, and the server's address in a hint) only to a key
    holder. The first call starts the search probe (``SearchChain.probe``) unless the app did at start."""
    svc = services(request)
    if svc.access.keys_required:
        try:
            await svc.access.check(request)  # wrong keys count here too (no free key oracle)
        except HTTPException:
            return {"keys_required": True}
    limits = svc.settings.api
    state = svc.engine_state
    detail = {"engine_detail": "; ".join(state.problems()) or None} if svc.access.keys_required else {}
    setup = [] if state.setup is None else [state.setup]
    if not svc.access.keys_required:  # everyone is a visitor: no server address
        setup = [h.model_copy(update={"params": {}}) if h.code == "engine_server_unreachable" else h for h in setup]
    search = svc.retriever.search
    # A moment for the search probe's verdict (offline, it fails in milliseconds), so that a page asking once,
    # with the engine ready, still learns search cannot work; a slower verdict shows on a later call.
    await asyncio.wait({search.probe()}, timeout=1.0)
    if search.unreachable is not None:
        backends = ", ".join(name for name, _ in search.unreachable)
        setup.append(SetupHint(code="search_no_backend", params={"backends": backends}))
    return {
        "keys_required": svc.access.keys_required,
        "ready": state.status == "ready",
        "engine": state.status,
        **detail,
        "setup": [hint.model_dump() for hint in setup],
        "model": svc.engine.model,
        "media": sorted(svc.engine.media) if state.started.is_set() else [],
        "default_mode": svc.settings.agent.mode,
        "limits": {
            "max_message_chars": limits.max_message_chars,
            "max_body_bytes": limits.max_body_bytes,
            "max_images": limits.max_images,
            "max_audio": limits.max_audio,
            "max_audio_seconds": limits.max_audio_seconds,
        },
    }
