"""Tiny random Qwen2 policy and Qwen2.5-Math-PRM-style folders for tests, built offline.

:func:`make_policy_folder` writes what a hub ``Qwen/Qwen2.5-Math-*-Instruct`` folder holds, at toy
size: ``config.json`` (``Qwen2ForCausalLM``), ``model.safetensors`` (transformers'
``Qwen2ForCausalLM`` with random weights), ``tokenizer.json`` + ``tokenizer_config.json``
(``Qwen2Tokenizer`` with a ChatML chat template) and ``generation_config.json`` (EOS ids as a
list, sampling defaults, a stop string). :func:`make_prm_folder` writes a
``Qwen2ForProcessRewardModel`` folder: a Qwen2 backbone ``model.*`` plus the score head
``score.0`` / ``score.2`` (``Linear(h, h) -> ReLU -> Linear(h, 2)``), and the same tokenizer
with ``<extra_0>`` added as a special token (the step marker of Qwen2.5-Math-PRM).

The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on a few lines of
math text, with the Qwen2 pre-tokenizer (the same regex split + byte-level mapping as
``transformers.Qwen2Tokenizer``), so ``"\\n\\n"`` and punctuation + newlines merge the way they
do in the real vocabulary. Special tokens: ``<|endoftext|>`` (pad), ``<|im_start|>``,
``<|im_end|>`` (EOS of the chat), appended after the learned vocabulary as in Qwen2.

On a shared 2-core machine call ``torch.set_num_threads(1)`` before building.
:func:`shared_folders` builds the default pair once per test process (read-only: a test that
edits a folder builds its own).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PRM_STEP_TOKEN = "<extra_0>"
LEARNED_VOCAB = 320
HIDDEN = 32

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's ChatML template without the tool branches (default system prompt included)."""

CORPUS = (
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "You are a helpful assistant.",
    "What is $1 + 2$? Compute the sum.\n\nThe sum is $3$.\n\nSo the answer is $\\boxed{3}$.",
    "Let $x = \\frac{1}{2}$. Then $2x = 1$.\n\nTherefore the answer is $\\boxed{\\frac{1}{2}}$.",
    "Find all $x$ such that $x^2 < 4$.\n\nWe get $-2 < x < 2$, so $\\boxed{(-2, 2)}$.",
    "Step 1: add the numbers.\n\nStep 2: divide by 3.\n\nThe final answer is 7.",
    "The area of the square is $16$ square units; its side is $4$ units.\n\n",
    "user assistant system question answer problem solution",
    # U+FFFD, what a decoder writes for invalid UTF-8 bytes, is one token of real byte-level
    # vocabularies too: a random policy's byte soup then re-encodes to as many tokens, not 3x.
    "\n".join(["\ufffd"] * 12),
)


@functools.cache
def _base_tokenizer_json() -> str:
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=LEARNED_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tok.to_str()


def build_tokenizer(with_step_token: bool = False) -> Tokenizer:
    """The tiny byte-level BPE with the Qwen special tokens (and ``<extra_0>`` for the PRM)."""
    tok = Tokenizer.from_str(_base_tokenizer_json())
    specials = list(SPECIAL_TOKENS) + ([PRM_STEP_TOKEN] if with_step_token else [])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _write_tokenizer(folder: Path, tok: Tokenizer) -> None:
    tok.save(str(folder / "tokenizer.json"))
    added = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in tok.get_vocab(with_added_tokens=True)
        if s in SPECIAL_TOKENS or s == PRM_STEP_TOKEN
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _qwen2_config(vocab_size: int, tok: Tokenizer):
    import transformers

    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        use_sliding_window=False,
    )


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _eos_ids(tok: Tokenizer) -> list[int]:
    return [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


def make_policy_folder(folder: str | Path, seed: int = 0, **generation) -> Path:
    """A tiny random ``Qwen2ForCausalLM`` folder with a chat-template tokenizer.

    ``generation`` overrides keys of ``generation_config.json`` (default: EOS ids
    ``[<|im_end|>, <|endoftext|>]``, ``max_new_tokens`` 64, temperature 0.7, stop string
    ``"\\n\\nQuestion:"``).
    """
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(_qwen2_config(tok.get_vocab_size(), tok)).float()
    _perturb(model, seed)
    model.eval().save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, tok)
    gen = {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": _eos_ids(tok),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "max_new_tokens": 64,
        "stop_strings": ["\n\nQuestion:"],
    } | generation
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return folder


def make_prm_folder(folder: str | Path, seed: int = 1) -> Path:
    """A tiny random ``Qwen2ForProcessRewardModel`` folder (backbone + 2-label score head) whose
    tokenizer has ``<extra_0>`` as an added special token."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(with_step_token=True)
    config = _qwen2_config(tok.get_vocab_size(), tok)
    torch.manual_seed(seed)
    backbone, head = prm_modules(config)
    _perturb(backbone, seed)
    _perturb(head, seed + 1000, std=0.5)
    tensors = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    tensors |= {f"score.{k}": v for k, v in head.state_dict().items()}
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    raw = config.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"]}
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    _write_tokenizer(folder, tok)
    gen = {"eos_token_id": _eos_ids(tok), "pad_token_id": tok.token_to_id("<|endoftext|>")}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return folder


@functools.cache
def shared_folders() -> tuple[Path, Path]:
    """``(policy, prm)``: the default :func:`make_policy_folder` and :func:`make_prm_folder`,
    built once per process in a temporary folder removed at exit. Treat them as read-only."""
    root = Path(tempfile.mkdtemp(prefix="tts-jax-lm-folders-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_policy_folder(root / "policy"), make_prm_folder(root / "prm")


def prm_modules(config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The PyTorch reference of ``Qwen2ForProcessRewardModel`` (not in transformers 5): a
    ``Qwen2Model`` backbone and ``Sequential(Linear(h, h), ReLU, Linear(h, 2))``."""
    import transformers

    backbone = transformers.Qwen2Model(config).float().eval()
    h = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    return backbone, head.eval()


def load_prm_reference(folder: str | Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The PRM folder's weights in :func:`prm_modules` (PyTorch)."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    config = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    backbone, head = prm_modules(config)
    tensors = load_file(str(folder / "model.safetensors"))
    backbone.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    head.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("score.")})
    return backbone, head


def reference_step_rewards(folder: str | Path, input_ids: np.ndarray) -> list[float]:
    """The Qwen2.5-Math-PRM model card's computation in PyTorch: softmax of the head's logits,
    kept at the ``<extra_0>`` positions, class 1."""
    backbone, head = load_prm_reference(folder)
    step_id = build_tokenizer(with_step_token=True).token_to_id(PRM_STEP_TOKEN)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)[None]
    with torch.no_grad():
        logits = head(backbone(input_ids=ids).last_hidden_state)
    probabilities = torch.softmax(logits, dim=-1) * (ids == step_id).unsqueeze(-1)
    sample = probabilities[0]
    return sample[sample != 0].view(-1, 2)[:, 1].tolist()
