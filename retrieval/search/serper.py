"""Google results through serper.dev (needs an API key)."""

from __future__ import annotations

import httpx

from retrieval.search.base import (
    BackendMisconfigured,
    BackendUnavailable,
    TimeRange,
    check_time_range,
    split_language,
    status_error,
    transport_error,
)
from retrieval.types import SearchResult

SERPER_URL = "https://google.serper.dev/search"


class SerperBackend:
    name = "serper"

    def __init__(self, api_key: str | None, client: httpx.AsyncClient, *, url: str = SERPER_URL) -> None:
        self._key = api_key
        self._client = client
        self._url = url

    async def search(
        self, query: str, *, k: int, language: str | None = None, time_range: TimeRange | None = None
    ) -> list[SearchResult]:
        check_time_range(time_range)
        if not self._key:
            raise BackendMisconfigured(
                self.name, "no serper.dev API key: set search.serper_api_key or remove 'serper' from search.backends"
            )
        body: dict[str, str | int] = {"q": query, "num": k}
        lang, country = split_language(language)
        if lang:
            # Google tells the two Chinese scripts apart only through hl=zh-cn / zh-tw.
            body["hl"] = f"zh-{country or 'cn'}" if lang == "zh" else lang
        if country:
            body["gl"] = country
        if time_range:
            body["tbs"] = f"qdr:{time_range[0]}"
        try:
            resp = await self._client.post(self._url, json=body, headers={"X-API-KEY": self._key})
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc, "serper.dev") from exc
        if resp.status_code in (401, 403):
            raise BackendMisconfigured(
                self.name,
                f"serper.dev rejected the API key (HTTP {resp.status_code}): check search.serper_api_key"
                f"{_detail(resp, ': ')}",
            )
        if resp.status_code != 200:
            raise status_error(self.name, resp.status_code, "serper.dev", _detail(resp))
        try:
            data = resp.json()
        except ValueError as exc:
            raise BackendUnavailable(self.name, "serper.dev answered with something other than JSON") from exc
        items = [item for item in data.get("organic") or [] if item.get("link")][:k]
        return [
            SearchResult(
                title=str(item.get("title") or ""),
                url=str(item["link"]),
                snippet=str(item.get("snippet") or ""),
                rank=i,
                engine=self.name,
                published=str(item["date"]) if item.get("date") else None,
            )
            for i, item in enumerate(items, start=1)
        ]

    async def aclose(self) -> None:
        """The shared HTTP client belongs to whoever made it."""


def _detail(resp: httpx.Response, prefix: str = "") -> str:
    """Serper explains refusals in a JSON ``message`` (e.g. "Not enough credits")."""
    try:
        message = resp.json().get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{prefix}{message}" if message else ""
