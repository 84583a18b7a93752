"""Vision-language model backends that answer one prompt about one image.

A backend is anything with a ``convention`` attribute (the grounding convention of its answers, see
:mod:`eligen.data.parse`) and an ``ask(prompt, image)`` method returning the model's raw answer text
(:class:`VLMBackend`). :class:`OpenAIBackend` talks to any OpenAI-compatible chat-completions server (vLLM,
SGLang, a hosted API) with httpx (one deadline per request). Transport problems (connection errors, timeouts, HTTP
errors, malformed server JSON) raise :class:`VLMError`; whether the answer itself is usable is for the parser to
decide.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from PIL import Image

BODY_EXCERPT_CHARS = 300


MAX_RESPONSE_BYTES = 4 * 2**20  # a chat answer with boxes is a few KiB


class VLMError(RuntimeError):
    """A request to a vision-language model failed (HTTP error, timeout, malformed server response)."""


@runtime_checkable
class VLMBackend(Protocol):
    """A vision-language model: ``ask`` returns its raw answer to ``prompt`` about ``image`` (or text only)."""

    convention: str  # "qwen2" | "qwen25" | "auto": how its answers write boxes

    def ask(self, prompt: str, image: Image.Image | None = None) -> str:
        """The model's raw answer text; raises :class:`VLMError` on transport problems."""
        ...


def image_data_url(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL (RGB PNG)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_base_url(url: str | None) -> None:
    """An OpenAI-compatible endpoint is an http:// or https:// URL with a host (None: not given)."""
    if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
        raise ValueError(f"--base-url must be an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1), got {url!r}")


class OpenAIBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (e.g. ``http://127.0.0.1:8000/v1`` of vLLM or SGLang).

    The API key is sent as ``Authorization: Bearer``. Each :meth:`ask` builds its own request, so one backend may
    be shared by many threads.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 1024, temperature: float = 0.0, convention: str = "auto"):
        if not base_url:
            raise ValueError("base_url is required (an OpenAI-compatible endpoint such as http://127.0.0.1:8000/v1)")
        check_base_url(base_url)
        if not model:
            raise ValueError("model is required: the model name the server serves")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._api_key = api_key
        self.timeout = float(timeout)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.convention = convention

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def payload(self, prompt: str, image: Image.Image | None = None) -> dict[str, Any]:
        """The JSON body of a chat request: one user message, the image (if any) before the text."""
        content: list[dict[str, Any]] = []
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
        content.append({"type": "text", "text": prompt})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post(self, payload: dict[str, Any]) -> bytes:
        """POST ``payload`` with httpx; the response body, or :class:`VLMError` for anything but a 200 within
        ``timeout``: one deadline for the whole request (connecting, sending, the headers and the body), so a
        server that trickles its headers or its answer cannot keep us past it."""
        import anyio
        import httpx2 as httpx

        body = json.dumps(payload).encode("utf-8")
        try:
            status, answer = anyio.run(self._exchange_within, body)
        except TimeoutError as exc:
            raise VLMError(f"{self.url} did not answer within {self.timeout:g} s (connecting, headers and body)"
                           ) from exc
        except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise VLMError(f"cannot reach {self.url}: {exc}") from exc
        except (httpx.HTTPError, OSError) as exc:  # connection reset, a malformed answer, ...
            raise VLMError(f"request to {self.url} failed: {exc or type(exc).__name__}") from exc
        if status != 200:
            raise VLMError(f"{self.url} answered HTTP {status}: {_excerpt(answer.decode('utf-8', 'replace'))}")
        return answer

    async def _exchange_within(self, body: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one request, cancelled (``TimeoutError``) when ``timeout`` has passed."""
        import anyio
        import httpx2 as httpx

        with anyio.fail_after(self.timeout):
            async with httpx.AsyncClient(timeout=None, follow_redirects=False) as client, client.stream(
                    "POST", self.url, content=body, headers=self._headers()) as response:
                return response.status_code, await self._read_body(response)

    async def _read_body(self, response) -> bytes:
        """The body as it arrives, capped at :data:`MAX_RESPONSE_BYTES` before any parsing."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
            raise VLMError(f"{self.url} sent more than {MAX_RESPONSE_BYTES // 2**20} MiB; refused unread")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise VLMError(f"{self.url} sent more than {MAX_RESPONSE_BYTES // 2**20} MiB; refused unread")
            chunks.append(chunk)
        return b"".join(chunks)

    def _content(self, body: bytes) -> str:
        """``choices[0].message.content`` of a chat response, or :class:`VLMError`."""
        text = body.decode("utf-8", "replace")
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise VLMError(f"{self.url} sent a response without choices[0].message.content: {_excerpt(text)}") from exc
        if not isinstance(content, str):
            raise VLMError(f"{self.url} sent a non-text message content: {_excerpt(text)}")
        return content

    def ask(self, prompt: str, image: Image.Image | None = None) -> str:
        """The model's raw answer to ``prompt`` about ``image``; raises :class:`VLMError` on transport problems."""
        return self._content(self._post(self.payload(prompt, image)))

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, convention={self.convention!r})"


class PoolBackend:
    """A pool of OpenAI-compatible servers serving one model (e.g. several vLLM replicas): request ``i`` goes to
    server ``i mod n`` (round-robin), and a request that fails with a transport error is sent to the next server,
    each at most once; :class:`VLMError` only when every server failed it. Safe to share between threads."""

    def __init__(self, backends: list[OpenAIBackend]):
        if not backends:
            raise ValueError("a server pool needs at least one endpoint")
        self.backends = backends
        self.convention = backends[0].convention
        self._turn = itertools.count()  # next() on a count is atomic under the GIL

    def ask(self, prompt: str, image: Image.Image | None = None) -> str:
        """The first answer, trying the servers from this request's turn onwards; :class:`VLMError` naming each
        server's failure when none answered."""
        start = next(self._turn)
        failures = []
        for offset in range(len(self.backends)):
            backend = self.backends[(start + offset) % len(self.backends)]
            try:
                return backend.ask(prompt, image)
            except VLMError as exc:
                failures.append(str(exc))
        raise VLMError(f"all {len(self.backends)} servers of the pool failed: " + "; ".join(failures))

    def __repr__(self) -> str:
        return f"PoolBackend({[b.base_url for b in self.backends]!r})"


VLM_KINDS = ("openai", "transformers")


def make_backend(kind: str, model: str | None, base_url: str | list[str] | None, api_key_env: str, timeout: float,
                 convention: str = "auto") -> VLMBackend:
    """The backend a command names: ``openai`` (needs ``base_url`` and the served model's name; the key is read
    from the environment variable ``api_key_env``) or ``transformers`` (a local Qwen2-VL / Qwen2.5-VL). Several
    ``base_url`` s make a :class:`PoolBackend`."""
    if kind == "transformers":
        if not model:
            raise ValueError("--model is required with --vlm transformers (a local path or a hub id)")
        from .transformers_backend import TransformersBackend

        return TransformersBackend(model, convention=convention)
    if kind != "openai":
        raise ValueError(f"unknown VLM backend {kind!r}; choose one of {VLM_KINDS}")
    if not base_url:
        raise ValueError("--base-url is required with --vlm openai (e.g. http://127.0.0.1:8000/v1 of a vLLM or "
                         "SGLang server)")
    if not model:
        raise ValueError("--model is required with --vlm openai (the model name the server serves)")
    urls = [base_url] if isinstance(base_url, str) else base_url
    backends = [OpenAIBackend(url, model, api_key=os.environ.get(api_key_env) or None, timeout=timeout,
                              convention=convention) for url in urls]
    return backends[0] if len(backends) == 1 else PoolBackend(backends)
