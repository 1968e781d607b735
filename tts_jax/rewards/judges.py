"""Judges: a vision-language model rates each image, through the host boundary.

Two judges turn decoded images ``x [N, 3, H, W]`` in ``[-1, 1]`` into scores ``float32[N]``
(higher is better), as host rewards (:func:`tts_jax.rewards.host.host_reward`: usable inside a
jitted sampler as a steering reward, no gradients) or, called on the final samples, as held-out
judges (the VLM-as-verifier setting of Ma et al. 2025, "Inference-Time Scaling for Diffusion
Models beyond Scaling Denoising Steps"):

- :func:`vlm_judge`: any transformers image-text-to-text PyTorch model (LLaVA, Qwen2-VL,
  Idefics, ...) with its processor, run on the host in batches;
- :func:`http_judge`: an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, TGI, ...),
  images sent as base64 PNG data URLs, standard library only (``urllib``).

Both render each particle to an 8-bit RGB PIL image (``round((x + 1) * 127.5)``, clipped), format
``prompt_template`` with the generation prompt (``prompt_template.format(prompt=prompt)``; write
literal braces as ``{{`` / ``}}``), ask the model, and parse a number from the reply with
``parse_score`` (default :func:`first_score`: the first number in ``[0, 10]``). A reply without
a score raises :class:`JudgeScoreError` (carrying the reply); with ``missing=v`` the score is
``v`` instead. Note that a host reward refuses NaN (:mod:`tts_jax.rewards.host`), so for
steering use ``missing=-inf`` (the particle is discarded); ``missing=nan`` is for held-out
evaluation through :meth:`Judge.score` directly.

Held-out use: ``judge = http_judge(...)``; ``judge(x)`` (a :class:`Reward`, eager or jitted), or
``judge.apply.fn.score(images)`` on NumPy images (the :class:`Judge` behind it).

Secrets (:func:`http_judge`): the API key is read from the environment variable
``api_key_env`` at each request and sent only in the ``Authorization`` header; it is never stored
on the judge, so it appears in no ``repr``, name, params, cache key or result, and it is
redacted from error messages.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tts_jax.rewards.base import Reward
from tts_jax.rewards.host import host_reward

ParseFn = Callable[[str], "float | None"]

DEFAULT_TEMPLATE = (
    'Rate this image from 0 to 10 for how well it matches the prompt "{prompt}" and for its '
    "visual quality. Reply with the number only."
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


class JudgeError(Exception):
    """Base class of the judges' errors."""


class JudgeScoreError(JudgeError, ValueError):
    """A judge's reply holds no score (``parse_score`` returned ``None``).

    Attributes:
        reply: the model's reply text.
    """

    def __init__(self, judge: str, reply: str):
        self.reply = reply
        super().__init__(f"judge {judge!r}: no score in the reply {reply!r}")


class JudgeReplyError(JudgeError, ValueError):
    """An endpoint's response is not a chat completion with a text message."""


class JudgeRequestError(JudgeError, ConnectionError):
    """A request failed for good: a client error (4xx other than 429), or a server error /
    connection failure that persisted through all retries."""


def first_score(reply: str, low: float = 0.0, high: float = 10.0) -> float | None:
    """The first number of ``reply`` within ``[low, high]`` (``"Score: 7.5/10"`` -> 7.5,
    ``"-2, no: 11, well 8"`` -> 8), or ``None``."""
    for match in _NUMBER.finditer(reply):
        value = float(match.group())
        if low <= value <= high:
            return value
    return None


def to_pil(x: np.ndarray) -> list[Any]:
    """``[N, 3, H, W]`` in ``[-1, 1]`` -> ``N`` RGB ``PIL.Image`` (8-bit, rounded, clipped;
    non-finite pixels become 0 = mid grey)."""
    from PIL import Image

    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"judges take RGB images [N, 3, H, W], got shape {x.shape}")
    x = np.where(np.isfinite(x), x, 0.0)
    pixels = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)), "RGB") for p in pixels]


@dataclasses.dataclass(eq=False)
class Judge:
    """Common part of the judges: a host function ``score(x [N, 3, H, W]) -> float32[N]``
    (hashed by identity, so one judge object shares one compilation).

    Attributes:
        name: label in results and messages.
        prompt: the generation prompt the template is formatted with.
        prompt_template: the question (``{prompt}`` is replaced).
        parse_score: ``reply -> float | None``.
        batch_size: images per model call (:class:`VLMJudge`) / requests in flight
            (:class:`HTTPJudge`).
        missing: the score of a reply without one; ``None`` raises :class:`JudgeScoreError`.
    """

    name: str
    prompt: str
    prompt_template: str
    parse_score: ParseFn
    batch_size: int
    missing: float | None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        self.question = self.prompt_template.format(prompt=self.prompt)

    def _parse(self, reply: str) -> float:
        value = self.parse_score(reply)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if self.missing is None:
                raise JudgeScoreError(self.name, reply)
            return float(self.missing)
        return float(value)

    def replies(self, images: Sequence[Any]) -> list[str]:
        """The model's replies to :attr:`question` about each PIL image."""
        raise NotImplementedError

    def score(self, x: np.ndarray) -> np.ndarray:
        """``float32[N]`` scores of ``x [N, 3, H, W]`` in ``[-1, 1]``."""
        return np.asarray([self._parse(r) for r in self.replies(to_pil(x))], np.float32)

    __call__ = score


# --------------------------------------------------------------------------- local VLM


@dataclasses.dataclass(eq=False)
class VLMJudge(Judge):
    """A transformers image-text-to-text model on the host (see :func:`vlm_judge`)."""

    model: Any = None
    processor: Any = None
    max_new_tokens: int = 16
    chat_template: bool = True
    generate_kwargs: dict = dataclasses.field(default_factory=dict)

    def _text(self) -> str:
        if not self.chat_template:
            return self.question
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.question}],
            }
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def replies(self, images: Sequence[Any]) -> list[str]:
        import torch

        text = self._text()
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            inputs = self.processor(
                images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True
            )
            device = getattr(self.model, "device", None)
            if device is not None and hasattr(inputs, "to"):
                inputs = inputs.to(device)
            kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
            with torch.inference_mode():
                generated = self.model.generate(**inputs, **(kwargs | self.generate_kwargs))
            prompt_ids = inputs["input_ids"]
            n = prompt_ids.shape[1]
            if generated.shape[1] >= n and torch.equal(generated[:, :n].cpu(), prompt_ids.cpu()):
                generated = generated[:, n:]  # decoder-only models return prompt + reply
            out += list(self.processor.batch_decode(generated, skip_special_tokens=True))
        if len(out) != len(images):
            raise JudgeReplyError(f"judge {self.name!r}: {len(out)} replies for {len(images)}")
        return out


def vlm_judge(
    model: Any,
    processor: Any,
    prompt_template: str = DEFAULT_TEMPLATE,
    parse_score: ParseFn = first_score,
    batch_size: int = 8,
    *,
    prompt: str = "",
    max_new_tokens: int = 16,
    chat_template: bool = True,
    generate_kwargs: dict | None = None,
    missing: float | None = None,
    name: str = "vlm_judge",
) -> Reward:
    """A transformers vision-language model as a host reward (greedy decoding).

    Per chunk of ``batch_size`` images: ``processor(images=chunk, text=[question] * B,
    return_tensors="pt", padding=True)`` (``question`` is the formatted template, wrapped by
    ``processor.apply_chat_template`` with one image and the text, unless ``chat_template`` is
    false: then the template itself must hold the model's image token), ``model.generate(...,
    max_new_tokens, do_sample=False, **generate_kwargs)``, the prompt tokens cut off,
    ``processor.batch_decode(..., skip_special_tokens=True)``, then ``parse_score``.

    Args:
        model: e.g. ``AutoModelForImageTextToText.from_pretrained(...)`` (eval mode, any device).
        processor: its ``AutoProcessor`` (left padding for batched decoder-only generation).
        prompt_template: the question; ``{prompt}`` becomes ``prompt``.
        parse_score: ``reply -> float | None`` (default :func:`first_score`).
        batch_size: images per ``generate`` call.
        prompt: the generation prompt.
        max_new_tokens, generate_kwargs: generation settings.
        missing: score of a reply without one (``None``: raise :class:`JudgeScoreError`).
        name: label in results.

    Returns:
        :class:`~tts_jax.rewards.base.Reward` ``x [N, 3, H, W] in [-1, 1] -> float32[N]``
        (``cond`` ignored; its ``apply.fn`` is the :class:`VLMJudge`).
    """
    judge = VLMJudge(
        name,
        prompt,
        prompt_template,
        parse_score,
        batch_size,
        missing,
        model=model,
        processor=processor,
        max_new_tokens=max_new_tokens,
        chat_template=chat_template,
        generate_kwargs=dict(generate_kwargs or {}),
    )
    return host_reward(judge, name)


# --------------------------------------------------------------------------- HTTP endpoint


def png_data_url(image: Any) -> str:
    """``data:image/png;base64,...`` of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_key(image: Any, question: str, model_name: str) -> str:
    """Cache key: sha256 of the 8-bit pixels and size, the question and the model."""
    digest = hashlib.sha256()
    for part in (model_name, question, f"{image.size}"):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(image.tobytes())
    return digest.hexdigest()


def _retryable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return isinstance(error, urllib.error.URLError | ConnectionError | TimeoutError)


@dataclasses.dataclass(eq=False)
class HTTPJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint (see :func:`http_judge`)."""

    url: str = ""
    model_name: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = 3
    backoff: float = 1.0
    timeout: float = 60.0
    max_tokens: int = 16
    cache: dict[str, str] | None = dataclasses.field(default_factory=dict, repr=False)
    requests_sent: int = dataclasses.field(default=0, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not self.url.rstrip("/").endswith("/chat/completions"):
            self.url = self.url.rstrip("/") + "/chat/completions"
        self._lock = threading.Lock()

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text

    def _body(self, image: Any) -> bytes:
        content = [
            {"type": "text", "text": self.question},
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
        ]
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }
        return json.dumps(body).encode()

    def _post(self, body: bytes) -> bytes:
        """POST with retries on 5xx / 429 / connection errors (sleep ``backoff * 2**k``)."""
        for attempt in range(self.max_retries + 1):
            headers = {"Content-Type": "application/json"}
            key = os.environ.get(self.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._lock:
                    self.requests_sent += 1
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if isinstance(error, urllib.error.HTTPError):
                    detail = f"HTTP {error.code}: {error.read()[:300]!r}"
                else:
                    detail = f"{type(error).__name__}: {error}"
                if not _retryable(error) or attempt == self.max_retries:
                    tries = f"after {attempt + 1} attempts" if _retryable(error) else "(no retry)"
                    message = f"judge {self.name!r}: POST {self.url} failed {tries}: {detail}"
                    raise JudgeRequestError(self._redact(message)) from None
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _reply(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if isinstance(content, list):  # content parts
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            content = "".join(t for t in texts if isinstance(t, str)) if texts else None
        if not isinstance(content, str):
            shown = self._redact(raw[:300].decode("utf-8", "replace"))
            raise JudgeReplyError(
                f"judge {self.name!r}: {self.url} did not return a chat completion with a "
                f"text message: {shown!r}"
            )
        return content

    def _ask(self, image: Any) -> str:
        return self._reply(self._post(self._body(image)))

    def replies(self, images: Sequence[Any]) -> list[str]:
        keys = [_image_key(im, self.question, self.model_name) for im in images]
        cache = self.cache if self.cache is not None else {}
        todo = {k: im for k, im in zip(keys, images, strict=True) if k not in cache}
        if todo:
            workers = min(self.batch_size, len(todo))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                found = dict(zip(todo, pool.map(self._ask, todo.values()), strict=True))
        else:
            found = {}
        replies = [cache.get(k, found.get(k)) for k in keys]
        if self.cache is not None:
            # Only replies that parse are kept, so a retry can fix a bad one.
            for k, reply in found.items():
                if self.parse_score(reply) is not None:
                    self.cache[k] = reply
        return replies


def http_judge(
    url: str,
    model_name: str,
    prompt_template: str = DEFAULT_TEMPLATE,
    *,
    prompt: str = "",
    api_key_env: str = "OPENAI_API_KEY",
    batch_size: int = 8,
    max_retries: int = 3,
    backoff: float = 1.0,
    cache: bool = True,
    parse_score: ParseFn = first_score,
    missing: float | None = None,
    timeout: float = 60.0,
    max_tokens: int = 16,
    name: str = "http_judge",
) -> Reward:
    """A judge behind an OpenAI-compatible chat-completions endpoint, as a host reward.

    One request per image (``{"model", "messages": [{"role": "user", "content": [text,
    image_url]}], "max_tokens", "temperature": 0}``, the image a PNG data URL), up to
    ``batch_size`` in flight at once (servers like vLLM batch concurrent requests); the reply is
    ``choices[0].message.content``.

    Args:
        url: the endpoint, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``
            (``/chat/completions`` is appended unless present).
        model_name: the ``model`` field.
        prompt_template: the question; ``{prompt}`` becomes ``prompt``.
        prompt: the generation prompt.
        api_key_env: environment variable holding the API key (read at each request, sent as
            ``Authorization: Bearer``; unset: no header, for local servers).
        batch_size: concurrent requests.
        max_retries: retries of a request after a 5xx / 429 response or a connection error,
            waiting ``backoff * 2**k`` seconds before retry ``k + 1``.
        backoff: the first wait, seconds.
        cache: keep replies by image hash (8-bit pixels) + question + model, so a repeated image
            costs no request (only replies that parse are cached).
        parse_score, missing: see the module docstring.
        timeout: seconds per request.
        max_tokens: reply length limit.
        name: label in results.

    Returns:
        :class:`~tts_jax.rewards.base.Reward` ``x [N, 3, H, W] in [-1, 1] -> float32[N]``
        (``cond`` ignored; its ``apply.fn`` is the :class:`HTTPJudge`).

    Raises (when scoring):
        JudgeRequestError: a 4xx response, or failures through all retries.
        JudgeReplyError: a response that is not a chat completion.
        JudgeScoreError: a reply without a score (unless ``missing`` is set).
    """
    judge = HTTPJudge(
        name,
        prompt,
        prompt_template,
        parse_score,
        batch_size,
        missing,
        url=url,
        model_name=model_name,
        api_key_env=api_key_env,
        max_retries=max_retries,
        backoff=backoff,
        timeout=timeout,
        max_tokens=max_tokens,
        cache={} if cache else None,
    )
    return host_reward(judge, name)
