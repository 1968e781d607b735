"""Judges (tts_jax.rewards.judges): a fake transformers VLM (batching, prompt, parsing) and a
local fake OpenAI-compatible server (batching, retry after a 500, malformed replies, the cache,
the API key kept out of every repr and message). No network, no real model."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tts_jax.rewards import judges

torch = pytest.importorskip("torch")

_call = jax.jit(lambda reward, x: reward(x))


def _images(n, seed=0, size=8):
    """``[n, 3, size, size]`` flat images of distinct brightness in ``[-1, 1]``."""
    levels = np.linspace(-0.9, 0.9, n)[np.random.default_rng(seed).permutation(n)]
    return np.broadcast_to(levels[:, None, None, None], (n, 3, size, size)).astype(np.float32)


def _expected(x):
    """What the fakes answer: 10 * mean brightness in [0, 1] of the 8-bit image, 2 decimals."""
    pixels = np.clip(np.round((x + 1) * 127.5), 0, 255)
    return np.round(10 * pixels.reshape(len(x), -1).mean(1) / 255, 2)


# --------------------------------------------------------------------------- fake local VLM


class FakeProcessor:
    """Character-level 'tokenizer': ids are code points; images become pixel_values."""

    def __init__(self):
        self.templates = []

    def apply_chat_template(self, messages, add_generation_prompt):
        assert add_generation_prompt and messages[0]["content"][0] == {"type": "image"}
        self.templates.append(messages[0]["content"][1]["text"])
        return "<user><image>" + messages[0]["content"][1]["text"] + "<assistant>"

    def __call__(self, images, text, return_tensors, padding):
        assert return_tensors == "pt" and len(images) == len(text)
        ids = torch.tensor([[ord(c) for c in t] for t in text])
        pixels = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images]))
        return {"input_ids": ids, "pixel_values": pixels}

    def batch_decode(self, ids, skip_special_tokens):
        return ["".join(chr(i) for i in row if i > 0) for row in ids.tolist()]


class FakeVLM:
    """``generate`` answers ``"Score: <10 * brightness>/10"`` (or a fixed reply), prompt first."""

    def __init__(self, reply=None):
        self.batches, self.reply, self.kwargs = [], reply, None

    def generate(self, input_ids, pixel_values, max_new_tokens, do_sample, **kwargs):
        self.batches.append(len(input_ids))
        self.kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
        means = pixel_values.reshape(len(input_ids), -1).mean(1).numpy() / 255
        replies = [self.reply or f"Score: {10 * m:.2f}/10" for m in means]
        width = max(map(len, replies))
        out = [[ord(c) for c in r] + [0] * (width - len(r)) for r in replies]
        return torch.cat([input_ids, torch.tensor(out)], dim=1)


def test_vlm_judge_batches_formats_and_parses():
    model, processor = FakeVLM(), FakeProcessor()
    reward = judges.vlm_judge(
        model, processor, "Rate {prompt!r} 0-10.", batch_size=2, prompt="a red cube"
    )
    x = _images(5)
    got = _call(reward, jnp.asarray(x))
    assert got.shape == (5,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _expected(x), atol=1e-6)
    assert model.batches == [2, 2, 1]
    assert processor.templates[0] == "Rate 'a red cube' 0-10."
    assert model.kwargs == {"max_new_tokens": 16, "do_sample": False}
    np.testing.assert_allclose(reward.apply.fn.score(x), _expected(x), atol=1e-6)  # held-out


def test_vlm_judge_reply_without_score():
    x = _images(3)
    reward = judges.vlm_judge(FakeVLM("I cannot rate this."), FakeProcessor())
    with pytest.raises(judges.JudgeScoreError, match="I cannot rate this") as err:
        reward.apply.fn.score(x)
    assert err.value.reply == "I cannot rate this."
    lenient = judges.vlm_judge(FakeVLM("no idea"), FakeProcessor(), missing=-np.inf)
    assert (np.asarray(_call(lenient, jnp.asarray(x))) == -np.inf).all()
    custom = judges.vlm_judge(FakeVLM("grade: B"), FakeProcessor(), parse_score=lambda r: 2.0)
    np.testing.assert_array_equal(custom.apply.fn.score(x), [2.0, 2.0, 2.0])


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("8", 8.0),
        ("Score: 7.5/10", 7.5),
        ("-2, no: 11, well 8.", 8.0),
        ("10/10", 10.0),
        ("n/a", None),
    ],
)
def test_first_score(reply, score):
    assert judges.first_score(reply) == score


# --------------------------------------------------------------------------- fake HTTP server


class FakeServer:
    """An OpenAI-compatible ``/v1/chat/completions`` in a thread, scripted per test."""

    def __init__(self):
        self.requests, self.auth, self.fail, self.mode = [], [], 0, "ok"
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                    server.auth.append(self.headers.get("Authorization"))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    fail = server.fail > 0
                    server.fail -= fail
                try:
                    threading.Event().wait(0.02)  # let concurrent requests overlap
                    if fail:
                        return self._send(500, {"error": "overloaded"})
                    if server.mode == "unauthorized":
                        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                        return self._send(401, {"error": f"Incorrect API key provided: {key}"})
                    if server.mode == "malformed":
                        return self._send(200, {"id": "x", "choices": []})
                    url = body["messages"][0]["content"][1]["image_url"]["url"]
                    png = base64.b64decode(url.removeprefix("data:image/png;base64,"))
                    mean = np.asarray(Image.open(io.BytesIO(png)), np.float32).mean() / 255
                    text = "no score here" if server.mode == "noscore" else f"{10 * mean:.2f}"
                    reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                    return self._send(200, reply)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def server():
    s = FakeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def fresh(server):
    server.requests.clear()
    server.auth.clear()
    server.fail, server.mode, server.max_inflight = 0, "ok", 0
    return server


KEY = "sk-test-0123456789abcdef"


def _judge(server, **kw):
    kw = {"api_key_env": "TTS_JUDGE_TEST_KEY", "backoff": 0.001, "prompt": "a cat"} | kw
    return judges.http_judge(server.url, "fake-vlm", "Rate {prompt}.", **kw)


def test_http_judge_batches_requests(fresh, monkeypatch):
    monkeypatch.setenv("TTS_JUDGE_TEST_KEY", KEY)
    reward = _judge(fresh, batch_size=3)
    x = _images(7)
    got = _call(reward, jnp.asarray(x))
    np.testing.assert_allclose(got, _expected(x), atol=1e-6)
    assert len(fresh.requests) == 7 and 1 < fresh.max_inflight <= 3
    path, body = fresh.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "fake-vlm"
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "Rate a cat."} and image["type"] == "image_url"
    assert set(fresh.auth) == {f"Bearer {KEY}"}


def test_http_judge_retries_after_500(fresh):
    reward = _judge(fresh, max_retries=2)
    fresh.fail = 1
    x = _images(1)
    np.testing.assert_allclose(reward.apply.fn.score(x), _expected(x), atol=1e-6)
    assert len(fresh.requests) == 2 and reward.apply.fn.requests_sent == 2
    fresh.fail = 10
    with pytest.raises(judges.JudgeRequestError, match="after 3 attempts: HTTP 500"):
        _judge(fresh, max_retries=2).apply.fn.score(_images(1, seed=1))


def test_http_judge_malformed_reply_and_missing_score(fresh):
    fresh.mode = "malformed"
    with pytest.raises(judges.JudgeReplyError, match="not return a chat completion"):
        _judge(fresh).apply.fn.score(_images(2))
    fresh.mode = "noscore"
    with pytest.raises(judges.JudgeScoreError, match="no score here"):
        _judge(fresh).apply.fn.score(_images(2))
    lenient = _judge(fresh, missing=float("nan")).apply.fn.score(_images(2))
    assert np.isnan(lenient).all()


def test_http_judge_cache_hit_costs_no_request(fresh):
    reward = _judge(fresh)
    x = _images(1)
    twice = np.concatenate([x, x])
    np.testing.assert_allclose(_call(reward, jnp.asarray(twice)), _expected(twice), atol=1e-6)
    np.testing.assert_allclose(reward.apply.fn.score(x), _expected(x), atol=1e-6)
    assert len(fresh.requests) == 1
    uncached = _judge(fresh, cache=False)
    uncached.apply.fn.score(x)
    uncached.apply.fn.score(x)
    assert len(fresh.requests) == 3


def test_api_key_never_shown(fresh, monkeypatch):
    monkeypatch.setenv("TTS_JUDGE_TEST_KEY", KEY)
    reward = _judge(fresh)
    reward.apply.fn.score(_images(2))
    shown = [repr(reward), str(reward), reward.name, repr(reward.apply.fn), str(reward.apply.fn)]
    shown += [repr(jax.tree_util.tree_leaves(reward)), repr(vars(reward.apply.fn))]
    assert not any(KEY in s for s in shown)
    fresh.mode = "unauthorized"  # a server that echoes the key in its error
    with pytest.raises(judges.JudgeRequestError) as err:
        _judge(fresh).apply.fn.score(_images(1, seed=3))
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value) and "***" in str(err.value)
