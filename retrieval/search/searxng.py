"""A SearXNG instance through its JSON API (``/search?format=json``)."""

from __future__ import annotations

from datetime import datetime

import httpx

from retrieval.search.base import (
    BackendMisconfigured,
    BackendUnavailable,
    TimeRange,
    check_time_range,
    status_error,
    transport_error,
)
from retrieval.types import SearchResult


def _iso(value: object) -> str | None:
    """SearXNG's ``publishedDate`` is ISO 8601 when set; keep anything else verbatim."""
    if not value:
        return None
    text = str(value).strip()
    try:
        return datetime.fromisoformat(text).isoformat()
    except ValueError:
        return text


class SearxngBackend:
    name = "searxng"

    def __init__(self, base_url: str, client: httpx.AsyncClient) -> None:
        self._base = base_url.rstrip("/")
        self._client = client

    async def search(
        self, query: str, *, k: int, language: str | None = None, time_range: TimeRange | None = None
    ) -> list[SearchResult]:
        check_time_range(time_range)
        url = f"{self._base}/search"
        params: dict[str, str | int] = {"q": query, "format": "json", "pageno": 1}
        if language:
            params["language"] = language
        if time_range:
            params["time_range"] = time_range
        try:
            resp = await self._client.get(url, params=params, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc, f"SearXNG at {self._base}") from exc
        if resp.status_code == 403:
            raise BackendMisconfigured(
                self.name,
                f"SearXNG at {self._base} refused format=json (HTTP 403): its JSON API is not enabled. "
                "Add `json` to `search.formats` in SearXNG's settings.yml "
                "(search: formats: [html, json]) and restart SearXNG.",
            )
        if resp.status_code == 404:
            raise BackendMisconfigured(
                self.name, f"{url} not found (HTTP 404): searxng_url must be the instance's base URL"
            )
        if resp.status_code != 200:
            raise status_error(self.name, resp.status_code, f"SearXNG at {self._base}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise BackendUnavailable(
                self.name, f"SearXNG at {self._base} answered with something other than JSON"
            ) from exc

        items = [item for item in data.get("results") or [] if item.get("url")][:k]
        results = [
            SearchResult(
                title=str(item.get("title") or ""),
                url=str(item["url"]),
                snippet=str(item.get("content") or ""),
                rank=i,
                engine=self.name,
                published=_iso(item.get("publishedDate")),
            )
            for i, item in enumerate(items, start=1)
        ]
        if not results and data.get("unresponsive_engines"):
            # An empty page is normal for an obscure query, but not when SearXNG's own engines
            # failed (CAPTCHAs, timeouts): tell the operator which ones.
            failed = ", ".join(" ".join(map(str, entry)) for entry in data["unresponsive_engines"])
            raise BackendUnavailable(self.name, f"no results; unresponsive engines: {failed}")
        return results

    async def aclose(self) -> None:
        """The shared HTTP client belongs to whoever made it."""
