"""Render a saved page in headless Chromium, offline: a screenshot (PNG) and the DOM after its
scripts ran. For tests (does a view render?) and for README screenshots; nothing here is needed
to *use* a view. Chromium runs with networking, component updates and the sandbox off and a
throw-away profile (``KN_LENS_CHROMIUM`` names the binary; else ``chromium`` /
``chromium-browser`` / ``google-chrome`` on PATH; Debian: ``apt-get install chromium``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from kn_lens.errors import ConfigError, ToolUnavailableError

__all__ = ["find_chromium", "screenshot", "rendered_dom"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary to use, or None."""
    env = os.environ.get("KN_LENS_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    return next((p for p in map(shutil.which, _NAMES) if p), None)


def _run(page: str | os.PathLike, extra: list[str], *, timeout: float,
         budget_ms: int) -> subprocess.CompletedProcess:
    binary = find_chromium()
    if binary is None:
        raise ToolUnavailableError("no Chromium found: install it (Debian: apt-get install "
                                   "chromium) or set KN_LENS_CHROMIUM to its binary")
    page = Path(page).resolve()
    if not page.is_file():
        raise ConfigError(f"no page to render at {page}")
    with tempfile.TemporaryDirectory(prefix="kn-lens-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={profile}", f"--virtual-time-budget={int(budget_ms)}",
               *extra, page.as_uri()]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise ToolUnavailableError(f"Chromium did not finish rendering {page.name} in "
                                       f"{timeout:.0f} s") from exc


def screenshot(page: str | os.PathLike, png: str | os.PathLike, *, width: int = 1000,
               height: int = 700, timeout: float = 90.0, budget_ms: int = 8000) -> Path:
    """Screenshot of ``page`` (an HTML file) after its scripts ran (``budget_ms`` of virtual
    time) into ``png``. Raises ToolUnavailableError when Chromium is missing or fails."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    try:
        res = _run(page, [f"--window-size={int(width)},{int(height)}",
                          "--hide-scrollbars", f"--screenshot={tmp}"],
                   timeout=timeout, budget_ms=budget_ms)
        if res.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
            raise ToolUnavailableError(f"Chromium failed on {Path(page).name} (exit "
                                       f"{res.returncode}): {res.stderr.strip()[-400:]}")
        tmp.replace(png)
    finally:
        if tmp.exists():
            tmp.unlink()
    return png


def rendered_dom(page: str | os.PathLike, *, timeout: float = 90.0, budget_ms: int = 8000) -> str:
    """The serialised DOM of ``page`` after its scripts ran (what they rendered)."""
    res = _run(page, ["--dump-dom"], timeout=timeout, budget_ms=budget_ms)
    if res.returncode != 0 or not res.stdout.strip():
        raise ToolUnavailableError(f"Chromium could not dump the DOM of {Path(page).name} (exit "
                                   f"{res.returncode}): {res.stderr.strip()[-400:]}")
    return res.stdout
