"""Tests of the embedded arithmetic policy LM and PRM (the shipped assets; nothing is trained).

The policy folder must load unchanged in transformers and agree with our NNX model (logits and
greedy generation); the policy must still solve held-out problems at the measured rate, and the
PRM must prefer correct solution prefixes to corrupted ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.app.tasks.arith_data import encode_prm_example
from tts_jax.app.tasks.arith_models import (
    ARITH_LM_DIR,
    eval_problems,
    load_arith_policy,
    load_arith_prm,
    sample_solutions,
)
from tts_jax.app.tasks.arithmetic import STEP_DELIMITER, Problem, check_solution_prefix, is_correct
from tts_jax.models.lm import forward, init_cache
from tts_jax.models.lm_reward import prm_scores

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_PROBLEMS = 32
# experiments/arith_models_eval.json measured greedy accuracy 0.815 on 200 held-out problems; the
# threshold (about 0.61) is that minus three binomial standard errors of a 32-problem estimate.
MEASURED_GREEDY_ACCURACY = 0.815
MIN_GREEDY_ACCURACY = MEASURED_GREEDY_ACCURACY - 3 * np.sqrt(
    MEASURED_GREEDY_ACCURACY * (1 - MEASURED_GREEDY_ACCURACY) / NUM_PROBLEMS
)


@pytest.fixture(scope="module")
def policy():
    return load_arith_policy()


@pytest.fixture(scope="module")
def problems():
    return eval_problems(NUM_PROBLEMS)


@pytest.fixture(scope="module")
def greedy_tokens(policy, problems):
    """Greedy completions of the held-out problems from our jitted generate."""
    _, model, tokenizer = policy
    return sample_solutions(model, tokenizer, problems, jax.random.key(0), temperature=0.0)


@pytest.fixture(scope="module")
def hf_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ARITH_LM_DIR))
    return model.eval()


def _truncate_at_eos(tokens, eos_id):
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def test_missing_assets_name_the_training_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="tts-jax train arith-lm"):
        load_arith_policy(tmp_path)
    with pytest.raises(FileNotFoundError, match="tts-jax train arith-prm"):
        load_arith_prm(tmp_path)


def test_folder_loads_in_transformers(policy):
    config, _, tokenizer = policy
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(ARITH_LM_DIR))
    text = "Q: (3+4)*2=?\n3+4=7\n7*2=14\nAnswer: 14"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    hf_config = transformers.AutoConfig.from_pretrained(str(ARITH_LM_DIR))
    assert hf_config.model_type == "llama" and hf_config.tie_word_embeddings
    assert hf_config.num_key_value_heads < hf_config.num_attention_heads  # GQA
    assert hf_config.vocab_size == config.vocab_size == tokenizer.vocab_size


def test_logits_match_transformers(policy, problems, hf_model):
    _, model, tokenizer = policy
    for problem in problems[:3]:
        ids = tokenizer.encode(problem.prompt + problem.solution)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits.numpy()
        ours, _ = jax.jit(forward)(
            model, jnp.asarray([ids], jnp.int32), init_cache(model.config, 1, len(ids))
        )
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(policy, problems, greedy_tokens, hf_model):
    _, _, tokenizer = policy
    for problem, ours in zip(problems[:2], greedy_tokens[:2], strict=True):
        prompt = tokenizer.encode(problem.prompt)
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=len(ours),
                eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id,
            )
        ref_completion = ref[0, len(prompt) :].tolist()
        assert _truncate_at_eos(ours, tokenizer.eos_id) == ref_completion


def test_policy_solves_held_out_problems(policy, problems, greedy_tokens):
    _, _, tokenizer = policy
    solved = [
        is_correct(p, tokenizer.decode(t)) for p, t in zip(problems, greedy_tokens, strict=True)
    ]
    assert np.mean(solved) >= MIN_GREEDY_ACCURACY


def _corrupt(problem: Problem, step: int) -> str:
    """The worked solution with the result of ``step`` off by one and later steps built on it."""
    values = problem.values
    values[step + 1] += 1
    lines = []
    for i, (op, operand) in enumerate(problem.ops):
        if i > step:
            values[i + 1] = Problem(values[i], ((op, operand),)).answer
        lines.append(f"{values[i]}{op}{operand}={values[i + 1]}")
    return STEP_DELIMITER.join([*lines, f"Answer: {values[-1]}"])


def test_prm_prefers_correct_prefixes(policy, problems):
    _, _, tokenizer = policy
    _, prm = load_arith_prm()
    chosen = problems[:4]
    texts = [p.solution for p in chosen] + [_corrupt(p, 0) for p in chosen]
    examples = [
        encode_prm_example(tokenizer, p, tokenizer.encode(t) + [tokenizer.eos_id])
        for p, t in zip(chosen + chosen, texts, strict=True)
    ]
    width = max(len(ids) for ids, _, _ in examples)
    pad = lambda row, value: list(row) + [value] * (width - len(row))
    ids = np.array([pad(e[0], tokenizer.pad_id) for e in examples], np.int32)
    mask = np.array([pad(e[1], False) for e in examples])
    labels = np.array([pad(e[2], 0) for e in examples])
    scores = np.asarray(jax.jit(prm_scores)(prm, jnp.asarray(ids), jnp.asarray(mask)))[mask]
    labels = labels[mask]
    assert np.all((scores > 0) & (scores < 1))
    assert labels.min() == 0 and labels.max() == 1
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_corrupted_solution_is_wrong_from_the_corrupted_step(problems):
    problem = problems[0]
    flags = check_solution_prefix(problem, _corrupt(problem, 1))
    assert flags == [True] + [False] * len(problem.ops)
