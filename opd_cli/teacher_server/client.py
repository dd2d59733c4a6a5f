"""HTTP client for a pool of vLLM OpenAI-compatible teacher servers (`teacher.server`).

Faults: a connection that fails, times out (`teacher.timeout_s` per request) or gets a 5xx answer is
retried on the next server of the pool after a backoff (`teacher.retry_backoff_s`, doubled per attempt,
at most 30 s), `teacher.retries` times; then `TeacherUnavailable`, which the OPD stage turns into a clean
stop that names the last good checkpoint. A 4xx answer is the request's fault and is not retried
(`TeacherRequestError`, with the server's message). Standard library only (urllib).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

from opd_cli.errors import OpdError

log = logging.getLogger("opd")
MAX_BACKOFF_S = 30.0


class TeacherServerError(OpdError):
    """A teacher server did not give a usable answer."""


class TeacherUnavailable(TeacherServerError):
    """No server of the pool answered within the retries."""


class TeacherRequestError(TeacherServerError):
    """A server refused the request (4xx) or answered with something that is not a full reply."""


class ServerPool:
    """Base URLs of servers that serve the same teacher; request i starts at server i mod n."""

    def __init__(self, urls: list[str], *, timeout_s: float, retries: int, retry_backoff_s: float):
        if not urls:
            raise ValueError("ServerPool needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.retries, self.retry_backoff_s = timeout_s, retries, retry_backoff_s
        self.requests_sent = 0  # POSTs that got a reply (for tests and the time split)

    def _once(self, url: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            url + path,
            data=data,
            headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
            raw = reply.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TeacherRequestError(
                f"{url}{path} answered with malformed JSON ({exc.msg} at byte {exc.pos} of {len(raw)})"
            ) from exc

    def call(self, path: str, body: dict | None = None, *, label: str, start: int = 0) -> tuple[dict, str]:
        """(reply JSON, the URL that answered) of GET (body None) or POST `path`."""
        last = "no attempt"
        began = time.monotonic()
        for attempt in range(self.retries + 1):
            url = self.urls[(start + attempt) % len(self.urls)]
            try:
                reply = self._once(url, path, body)
                self.requests_sent += 1
                return reply, url
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code < 500:
                    raise TeacherRequestError(
                        f"{label}: {url}{path} refused it (HTTP {exc.code}): {message}"
                    ) from exc
                last = f"HTTP {exc.code} from {url}: {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{url}: {type(reason).__name__}: {reason}"
            if attempt < self.retries:
                wait = min(self.retry_backoff_s * 2**attempt, MAX_BACKOFF_S)
                log.warning(
                    "%s failed (%s); retry %d/%d in %.1f s", label, last, attempt + 1, self.retries, wait
                )
                time.sleep(wait)
        raise TeacherUnavailable(
            f"{label}: no teacher server answered after {self.retries + 1} attempt(s) over "
            f"{time.monotonic() - began:.0f} s (last: {last})"
        )


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(exc.read())
        return str(payload.get("error", {}).get("message") or payload.get("message") or payload)
    except Exception:  # noqa: BLE001 - the body of an error page is best effort
        return exc.reason or "no message"
