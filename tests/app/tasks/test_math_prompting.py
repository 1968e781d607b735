"""Math prompts: chat template ids equal transformers', generation_config settings, steps."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import shared_folders  # noqa: E402
from tts_jax.app.tasks.math import prm_format as F  # noqa: E402
from tts_jax.app.tasks.math import prompting as P  # noqa: E402

PROBLEM = "What is $\\frac{1}{2} + \\frac{1}{3}$?"


@pytest.fixture(scope="module")
def policy():
    return shared_folders()[0]


@pytest.fixture(scope="module")
def tokenizer(policy):
    return P.load_tokenizer(policy)


@pytest.mark.parametrize("system", [P.QWEN_MATH_SYSTEM, None, "Be brief."])
def test_prompt_ids_equal_transformers_chat_template(policy, tokenizer, system):
    reference = transformers.AutoTokenizer.from_pretrained(str(policy))
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": PROBLEM}
    ]
    expected = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    ids = P.build_prompt(tokenizer, PROBLEM, system)
    assert ids == list(expected)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and PROBLEM in text
    assert (system or "You are a helpful assistant.") in text
    assert F.problem_from_chat_prompt(tokenizer, ids) == PROBLEM


def test_a_folder_without_a_chat_template(policy, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(policy, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = P.load_tokenizer(folder)
    with pytest.raises(P.MissingChatTemplateError, match="plain=True"):
        P.build_prompt(tok, PROBLEM)
    ids = P.build_prompt(tok, PROBLEM, plain=True)
    assert tok.decode(ids) == f"{P.QWEN_MATH_SYSTEM}\n\n{PROBLEM}\n\n"
    with pytest.raises(FileNotFoundError):
        P.load_tokenizer(tmp_path / "nowhere")


def test_generation_settings(policy, tokenizer, tmp_path):
    s = P.read_generation_settings(policy, tokenizer)
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert s.eos_ids == (im_end, eot) and s.stop_ids == (im_end, eot)
    assert s.pad_id == eot and s.max_new_tokens == 64 and s.temperature == 0.7
    assert s.multi_token_stops == ("\n\nQuestion:",)
    assert s.unsupported == {"top_p": 0.8}

    folder = tmp_path / "other"
    shutil.copytree(policy, folder)
    gen = {"eos_token_id": im_end, "stop_strings": ["\n\n", "Question:"], "do_sample": False}
    gen |= {"top_p": 1.0, "top_k": 20, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    s = P.read_generation_settings(folder, tokenizer)
    sep = F.step_separator_id(tokenizer)
    assert s.eos_ids == (im_end,) and s.stop_ids == (im_end, sep)
    assert s.multi_token_stops == ("Question:",) and s.temperature == 0.0
    assert s.max_new_tokens is None and s.pad_id == eot  # the tokenizer's pad
    assert s.unsupported == {"top_k": 20, "repetition_penalty": 1.05}

    (folder / "generation_config.json").unlink()
    assert P.read_generation_settings(folder, tokenizer).stop_ids == (im_end,)
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        P.read_generation_settings(folder, tokenizer)


def test_step_separators(tokenizer):
    sep = F.step_separator_id(tokenizer)
    assert tokenizer.decode([sep]) == "\n\n"
    enders = F.separator_token_ids(tokenizer)
    assert sep in enders
    merged = tokenizer("is 3.\n\nSo", add_special_tokens=False)["input_ids"]
    assert sep not in merged  # BPE merged ".\n\n": a step end that is not sep_id
    assert any(i in enders for i in merged)
    assert all(tokenizer.decode([i]).endswith("\n\n") for i in enders)
    with pytest.raises(ValueError, match="single-token"):
        F.step_separator_id(tokenizer, "\n\nStep")
    assert F.split_steps("a\n\n b \n\n\n\nc\n\n") == ["a", "b", "c"]


def test_the_policy_folder_loads_and_generates_from_the_prompt(policy, tokenizer):
    from tts_jax.models.lm import generate, load_lm

    config, model = load_lm(policy)
    assert config.vocab_size == len(tokenizer)
    settings = P.read_generation_settings(policy, tokenizer)
    ids = np.asarray([P.build_prompt(tokenizer, PROBLEM)], np.int32)
    out = generate(
        model,
        ids,
        jax.random.key(0),
        max_new_tokens=4,
        eos_id=list(settings.stop_ids),
        pad_id=settings.pad_id,
    )
    assert np.asarray(out.tokens).shape[0] == 1
