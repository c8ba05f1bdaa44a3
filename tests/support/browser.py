"""A headless Chromium for the dashboard's browser tests: the system's own (Debian's ``chromium``), driven by
Playwright, with what went wrong in a page collected: console errors and warnings, uncaught exceptions, and
Content-Security-Policy violations."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

from playwright.async_api import BrowserContext, ConsoleMessage, Dialog, Error

__all__ = ["CHROMIUM_ARGS", "NO_CHROMIUM", "PageWatch", "chromium_path"]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # on a closed network these stall the start (Playwright gives a fresh profile)
    "--disable-component-update",
    "--disable-sync",
]

NO_CHROMIUM = (
    "Chromium is not installed (or CARAVAN_CHROMIUM names no program): the dashboard's browser tests need it. "
    "./dev/test installs it when apt-get may be used (root or sudo -n); by hand: `sudo apt-get install chromium`, "
    "or CARAVAN_CHROMIUM=/path/to/chromium"
)

_REPORT = """
document.addEventListener("securitypolicyviolation", (e) => {
  const where = `${e.sourceFile}:${e.lineNumber}`;
  window.caravanPolicyViolation(`${e.effectiveDirective} refused ${e.blockedURI || "inline"} (${where})`);
});
"""


def chromium_path() -> str | None:
    """The Chromium to test with: ``CARAVAN_CHROMIUM`` when set, else Debian's ``/usr/bin/chromium`` or one on PATH."""
    chosen = os.environ.get("CARAVAN_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@dataclass
class PageWatch:
    """What the pages of a browser context did wrong, and the dialogs they opened (each one accepted, but for those
    :meth:`dismiss_next` asks to cancel)."""

    problems: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    _allowed: list[re.Pattern[str]] = field(default_factory=list)
    _dismissing: int = 0

    @classmethod
    async def attach(cls, context: BrowserContext) -> PageWatch:
        watch = cls()
        await context.expose_function("caravanPolicyViolation", lambda text: watch._problem(f"CSP: {text}"))
        await context.add_init_script(_REPORT)
        context.on("page", watch._page)
        return watch

    def allow(self, pattern: str) -> None:
        """Console messages and policy violations matching ``pattern`` are expected from now on (a refusal the test
        asks for)."""
        self._allowed.append(re.compile(pattern))

    def dismiss_next(self) -> None:
        """The next dialog a page opens is cancelled (a confirmation answered no), not accepted; it is recorded all
        the same."""
        self._dismissing += 1

    def _problem(self, text: str) -> None:
        if not any(p.search(text) for p in self._allowed):
            self.problems.append(text)

    def assert_clean(self) -> None:
        assert self.problems == [], "the page reported problems:\n" + "\n".join(self.problems)

    def _page(self, page: object) -> None:
        page.on("console", self._console)  # type: ignore[attr-defined]
        page.on("pageerror", self._error)  # type: ignore[attr-defined]
        page.on("dialog", self._dialog)  # type: ignore[attr-defined]

    def _console(self, message: ConsoleMessage) -> None:
        if message.type not in ("error", "warning"):
            return
        self._problem(f"console {message.type}: {message.text} ({message.location.get('url', '')})")

    def _error(self, error: Error) -> None:
        self.problems.append(f"uncaught: {error.name}: {error.message}")

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        if self._dismissing:
            self._dismissing -= 1
            await dialog.dismiss()
        else:
            await dialog.accept()
