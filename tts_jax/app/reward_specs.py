"""``--reward`` / ``--held-out`` specs of the text-to-image task: parse, check, build.

A spec is ``KIND=ARG[,ARG...][,key=value...]``::

    clip=DIR                      CLIPScore (Hessel et al. 2021) with the CLIP folder DIR
    pickscore=DIR                 PickScore (Kirstain et al. 2023), DIR a PickScore CLIP folder
    aesthetic=DIR,HEAD            LAION aesthetic head HEAD (safetensors) on the CLIP folder DIR
    hps=FILE                      HPSv2 (Wu et al. 2023) state dict FILE (safetensors)
    image_reward=DIR              ImageReward (Xu et al. 2023) folder DIR
    http=URL,model=NAME           a judge behind an OpenAI-compatible endpoint

Keys every kind takes: ``weight=W`` (the member's weight in a ``mean`` ensemble, default 1).
``clip`` / ``pickscore`` take ``processor=DIR`` (preprocessor and tokenizer from DIR, for
PickScore folders without them); ``hps`` takes ``tokenizer=DIR`` (default: FILE's folder) and
``config=JSON`` (an open_clip model config, default ViT-H-14); ``http`` takes ``key_env=VAR``
(the environment variable holding the API key, default ``OPENAI_API_KEY``).

Every reward that reads text is built with the run's prompt. Secrets never enter a spec, so they
never reach a record: the HTTP judge's key is read from the environment at each request
(:func:`tts_jax.rewards.judges.http_judge`); a spec with ``key=``/``api_key=`` or a URL with
credentials is refused.

Local paths are made absolute in the canonical spec (:attr:`RewardSpec.text`), the form recorded
in a run's config, so a run's identity does not depend on the working directory.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from pathlib import Path
from typing import Any

from tts_jax.rewards.base import Reward


class RewardSpecError(ValueError):
    """A ``--reward`` / ``--held-out`` spec that cannot be parsed or built (message says why)."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a reward kind takes.

    Attributes:
        paths: names of the positional arguments (all local paths, checked to exist).
        keys: optional ``key=value`` arguments (besides ``weight``).
        path_keys: the keys whose values are local paths.
        description: one line for help texts.
    """

    paths: tuple[str, ...]
    keys: tuple[str, ...]
    path_keys: tuple[str, ...]
    description: str


KINDS: dict[str, Kind] = {
    "clip": Kind(("DIR",), ("processor",), ("processor",), "CLIPScore with a CLIP folder"),
    "pickscore": Kind(("DIR",), ("processor",), ("processor",), "PickScore CLIP folder"),
    "aesthetic": Kind(("DIR", "HEAD"), (), (), "LAION aesthetic head on a CLIP folder"),
    "hps": Kind(("FILE",), ("tokenizer", "config"), ("tokenizer", "config"), "HPSv2 safetensors"),
    "image_reward": Kind(("DIR",), (), (), "ImageReward folder"),
    "http": Kind(("URL",), ("model", "key_env"), (), "OpenAI-compatible judge endpoint"),
}
"""The reward kinds a spec may name."""
SECRET_KEYS = ("key", "api_key", "token", "password", "secret")


def kinds_text() -> str:
    """``clip=DIR, pickscore=DIR, ...``: every kind with its arguments (for messages)."""
    return ", ".join(f"{name}={','.join(k.paths)}" for name, k in KINDS.items()) + (
        " (http also needs model=NAME)"
    )


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A parsed spec.

    Attributes:
        kind: a name in :data:`KINDS`.
        args: the positional arguments (absolute local paths, or the URL).
        options: the ``key=value`` arguments (paths absolute), ``weight`` excluded.
        weight: the member's weight in a ``mean`` ensemble.
    """

    kind: str
    args: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    weight: float = 1.0

    @property
    def name(self) -> str:
        """The reward's label in results (``clip``, ``pickscore``, ...)."""
        return self.kind

    @property
    def text(self) -> str:
        """The canonical spec (what run configs record)."""
        parts = [*self.args, *(f"{k}={v}" for k, v in self.options)]
        if self.weight != 1.0:
            parts.append(f"weight={self.weight:g}")
        return f"{self.kind}={','.join(parts)}"


def _absolute(value: str, what: str, spec: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
        raise RewardSpecError(f"reward spec {spec!r}: {what} {value} does not exist")
    return str(path.resolve())


def _check_url(url: str, spec: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RewardSpecError(f"reward spec {spec!r}: {url!r} is not an http(s) URL")
    if parsed.username or parsed.password:
        raise RewardSpecError(
            f"reward spec {spec!r}: the URL carries credentials; put the API key in an "
            "environment variable (key_env=VAR, default OPENAI_API_KEY), never in the spec"
        )


def parse_spec(spec: str) -> RewardSpec:
    """Parse and check one spec (paths must exist; they become absolute).

    Raises:
        RewardSpecError: no ``KIND=``, an unknown kind or key (listing the known ones), a missing
            or extra argument, a path that does not exist, a bad weight, or a secret in the spec.
    """
    kind, sep, rest = spec.partition("=")
    kind = kind.strip()
    if not sep or kind not in KINDS:
        what = f"unknown reward kind {kind!r}" if sep else "no KIND= prefix"
        raise RewardSpecError(f"reward spec {spec!r}: {what}; known: {kinds_text()}")
    entry = KINDS[kind]
    args: list[str] = []
    options: dict[str, str] = {}
    weight = 1.0
    for part in (p.strip() for p in rest.split(",")) if rest.strip() else ():
        key, eq, value = part.partition("=")
        if eq and key in SECRET_KEYS:
            raise RewardSpecError(
                f"reward spec {spec!r}: secrets never go in a spec (it is recorded); put the API "
                "key in an environment variable and name it with key_env=VAR"
            )
        if eq and key == "weight":
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight <= 0:
                raise RewardSpecError(f"reward spec {spec!r}: weight must be > 0, got {value!r}")
        elif eq and key in entry.keys:
            options[key] = value
        elif eq and kind != "http":
            raise RewardSpecError(
                f"reward spec {spec!r}: unknown key {key!r} for {kind}; it takes "
                + ", ".join(f"{k}=" for k in (*entry.keys, "weight"))
            )
        else:
            args.append(part)
    usage = f"{kind}={','.join(entry.paths)}"
    if len(args) != len(entry.paths) or not all(args):
        raise RewardSpecError(
            f"reward spec {spec!r}: {kind} takes {len(entry.paths)} argument(s), {usage}; "
            f"got {len(args)}"
        )
    if kind == "http":
        _check_url(args[0], spec)
        if not options.get("model"):
            raise RewardSpecError(f"reward spec {spec!r}: http needs model=NAME ({usage},model=)")
    else:
        args = [_absolute(a, name, spec) for a, name in zip(args, entry.paths, strict=True)]
    for key in entry.path_keys:
        if key in options:
            options[key] = _absolute(options[key], key, spec)
    return RewardSpec(kind, tuple(args), tuple(sorted(options.items())), weight)


def parse_specs(specs: tuple[str, ...] | list[str], flag: str) -> list[RewardSpec]:
    """Parse every spec of one flag (:func:`unique_names` labels them).

    Raises:
        RewardSpecError: see :func:`parse_spec` (the message names ``flag``).
    """
    out = []
    for spec in specs:
        try:
            out.append(parse_spec(spec))
        except RewardSpecError as err:
            raise RewardSpecError(f"{flag}: {err}") from None
    return out


def unique_names(specs: list[RewardSpec]) -> list[str]:
    """Labels of the specs: the kind, with ``_2``, ``_3``... for repeats."""
    seen: dict[str, int] = {}
    names = []
    for s in specs:
        seen[s.kind] = seen.get(s.kind, 0) + 1
        names.append(s.kind if seen[s.kind] == 1 else f"{s.kind}_{seen[s.kind]}")
    return names


# --------------------------------------------------------------------------- building


def _require_tokenizer(folder: str, spec: RewardSpec) -> str:
    names = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
    if not any((Path(folder) / n).is_file() for n in names):
        raise RewardSpecError(
            f"reward spec {spec.text!r}: no tokenizer in {folder} (expected one of "
            f"{', '.join(names)}); pass tokenizer=DIR (e.g. the tokenizer of "
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        )
    return folder


def build_image_reward(spec: RewardSpec, prompt: str, dtype: Any, name: str) -> Reward:
    """The reward of ``spec`` on decoded images ``[N, 3, H, W]`` in ``[-1, 1]``, built with
    ``prompt`` (the kinds that read text).

    Raises:
        RewardSpecError: a missing tokenizer; the loaders' named errors otherwise
            (``FileNotFoundError`` / ``ValueError`` subclasses).
    """
    options = dict(spec.options)
    if spec.kind in ("clip", "pickscore"):
        from tts_jax.rewards import clip

        extra: dict[str, Any] = {}
        if "processor" in options:
            extra = {
                "preprocess_config": clip.load_preprocess(options["processor"]),
                "tokenizer": options["processor"],
            }
        build = clip.clip_score if spec.kind == "clip" else clip.pickscore
        return build(spec.args[0], prompt, dtype=dtype, name=name, **extra)
    if spec.kind == "aesthetic":
        from tts_jax.rewards.clip import laion_aesthetic

        return laion_aesthetic(spec.args[0], spec.args[1], dtype=dtype, name=name)
    if spec.kind == "hps":
        import json

        from tts_jax.rewards import hps

        tokenizer = _require_tokenizer(
            options.get("tokenizer", str(Path(spec.args[0]).parent)), spec
        )
        config = hps.VIT_H_14
        if "config" in options:
            config = json.loads(Path(options["config"]).read_text())
        return hps.hps_v2(
            spec.args[0], prompt, tokenizer=tokenizer, model_config=config, dtype=dtype, name=name
        )
    if spec.kind == "image_reward":
        from tts_jax.rewards.image_reward import image_reward

        return image_reward(spec.args[0], prompt, dtype=dtype, name=name)
    if spec.kind == "http":
        from tts_jax.rewards.judges import http_judge

        return http_judge(
            spec.args[0],
            options["model"],
            prompt=prompt,
            api_key_env=options.get("key_env", "OPENAI_API_KEY"),
            name=name,
        )
    raise RewardSpecError(f"unknown reward kind {spec.kind!r}; known: {kinds_text()}")
