"""CORS (CARAVAN_CORS_ORIGINS): the origins a customer's web app may call the API from, as an operator writes them."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from pydantic import ValidationError

from control.settings import Settings


def test_the_origins_are_read_from_the_environment_as_a_browser_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARAVAN_CORS_ORIGINS", raising=False)
    assert Settings().cors_origins == ()
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", "")
    assert Settings().cors_origins == ()
    monkeypatch.setenv(
        "CARAVAN_CORS_ORIGINS", " HTTPS://App.Example.com:443, http://localhost:3000,,https://app.example.com,"
    )
    assert Settings().cors_origins == ("https://app.example.com", "http://localhost:3000")
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", "http://127.0.0.1:80,http://[::1]:8080")
    assert Settings().cors_origins == ("http://127.0.0.1", "http://[::1]:8080")


BAD: Mapping[str, str] = {
    "*": "wildcards are not allowed, name each origin that may call the API",
    "https://*.example.com": "wildcards are not allowed, name each origin that may call the API",
    "https://app.example.com/": "it has a path (a trailing slash is one: leave it out)",
    "https://app.example.com/app": "it has a path",
    "https://app.example.com?x=1": "it has a query",
    "https://app.example.com#top": "it has a fragment",
    "https://user:secret@app.example.com": "it has a user name or password",
    "ftp://app.example.com": "the scheme 'ftp' is neither http nor https",
    "app.example.com": "no scheme://",
    "null": "no scheme://",
    "https://app.example.com:0": "the port '0' is not a number from 1 to 65535",
    "https://app.example.com:https": "the port 'https' is not a number from 1 to 65535",
    "https://app_example.com": "'app_example.com' is not a host name",
    "https://bücher.example": "a host name outside ASCII is written as the browser sends it (xn--...)",
    "http://[::g]": "[::g] is not an IPv6 address",
}


@pytest.mark.parametrize("bad", list(BAD))
def test_an_entry_that_is_not_an_exact_origin_is_refused_by_name(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARAVAN_CORS_ORIGINS", f"https://ok.example.com, {bad}")
    with pytest.raises(ValidationError) as refused:
        Settings()
    (error,) = refused.value.errors()
    assert error["loc"] == ("cors_origins",)
    assert error["msg"] == (
        f"Value error, {bad!r} is not an origin (scheme://host[:port], e.g. https://app.example.com): {BAD[bad]}"
    )
