"""Tests of the arithmetic task: generation, exact checker, tokenizer, SFT/PRM batches."""

import ast
import json
import operator

import numpy as np
import pytest
from transformers import AutoTokenizer

from tts_jax.app.tasks import arith_data
from tts_jax.app.tasks.arith_tokenizer import ARITH_LM_DIR, ArithTokenizer
from tts_jax.app.tasks.arithmetic import (
    ANSWER_PREFIX,
    EOS_TOKEN,
    STEP_DELIMITER,
    ArithConfig,
    check_solution_prefix,
    check_step,
    extract_answer,
    generate_problems,
    is_correct,
    is_valid_solution,
)

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _int_value(node: ast.AST) -> int:
    """Evaluate an ast of + - * over int literals with Python ints (no eval of strings)."""
    if isinstance(node, ast.Expression):
        return _int_value(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_int_value(node.left), _int_value(node.right))
    raise ValueError(f"unexpected node {ast.dump(node)}")


@pytest.fixture(scope="module")
def problems():
    return generate_problems(500, seed=7, config=ArithConfig(mul_prob=0.3))


@pytest.fixture(scope="module")
def tok():
    return ArithTokenizer.load()


def test_generation_is_deterministic_by_seed():
    assert generate_problems(50, seed=3) == generate_problems(50, seed=3)
    assert generate_problems(50, seed=3) != generate_problems(50, seed=4)


def test_config_controls_difficulty():
    config = ArithConfig(min_ops=2, max_ops=4, max_operand=9, mul_prob=0.0, max_value=50)
    for p in generate_problems(300, seed=0, config=config):
        assert 2 <= len(p.ops) <= 4
        assert all(op in "+-" and 1 <= a <= 9 for op, a in p.ops)
        assert all(0 <= v <= 50 for v in p.values)
    with pytest.raises(ValueError):
        ArithConfig(min_ops=5, max_ops=3)


def test_worked_solutions_pass_and_match_expression(problems):
    assert any("*" in p.expression for p in problems)
    assert any("(" in p.expression for p in problems)
    for p in problems:
        assert _int_value(ast.parse(p.expression, mode="eval")) == p.answer
        assert p.prompt == f"Q: {p.expression}=?\n"
        flags = check_solution_prefix(p, p.solution)
        assert flags == [True] * (len(p.ops) + 1)
        assert is_valid_solution(p, p.solution) and is_correct(p, p.solution)
        assert extract_answer(p.solution) == p.answer
        assert p.solution.split(STEP_DELIMITER)[-1] == f"{ANSWER_PREFIX}{p.answer}"


def test_partial_solution_prefixes(problems):
    p = problems[0]
    steps = p.steps
    assert check_solution_prefix(p, "") == []
    assert check_solution_prefix(p, steps[0] + STEP_DELIMITER) == [True]
    assert check_solution_prefix(p, p.solution + EOS_TOKEN + "garbage") == [True] * (len(steps) + 1)
    assert check_step(p, [], steps[0]) and check_step(p, steps[:1], steps[1])
    assert check_step(p, steps, p.answer_line) and check_step(p, steps[:1], f" {steps[1]} ")
    assert not check_step(p, steps[:1], steps[0])


def _corruptions(p, k):
    """Variants of the solution whose step ``k`` is the first wrong one."""
    values, (op, operand) = p.values, p.ops[k]
    lines = [*p.steps, p.answer_line]
    wrong_result = f"{values[k]}{op}{operand}={values[k + 1] + 1}"
    wrong_operand = f"{values[k]}{op}{operand + 1}={values[k + 1]}"
    wrong_left = f"{values[k] + 10}{op}{operand}={values[k + 1]}"
    swapped = f"{operand}{op}{values[k]}={values[k + 1]}"
    skipped, early_answer = lines[k + 1], p.answer_line
    candidates = (wrong_result, wrong_operand, wrong_left, swapped, skipped, early_answer)
    for bad in (*candidates, "#$%x", ""):
        if bad != lines[k]:
            yield STEP_DELIMITER.join([*lines[:k], bad, *lines[k + 1 :]])


def test_corrupted_steps_rejected_at_the_right_index(problems):
    for p in problems[:100]:
        for k in range(len(p.ops)):
            for text in _corruptions(p, k):
                flags = check_solution_prefix(p, text)
                assert flags[:k] == [True] * k and not any(flags[k:]), (p, text, flags)
                assert not is_valid_solution(p, text)


def test_wrong_answer_line_rejected(problems):
    p = problems[1]
    text = STEP_DELIMITER.join([*p.steps, f"{ANSWER_PREFIX}{p.answer + 1}"])
    assert check_solution_prefix(p, text) == [True] * len(p.ops) + [False]
    assert not is_correct(p, text)
    extra = STEP_DELIMITER.join([*p.steps, p.steps[-1], p.answer_line])
    assert check_solution_prefix(p, extra)[-1] is False


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "Answer:",
        "Answer: ",
        "Answer: 4 4",
        "Answer: 12a",
        "Answer: 1.5",
        "Answer: " + "9" * 5000,
        "Answers 12",
        "12+3=15\n",
        "\x00\xff\n\n",
    ],
)
def test_extract_answer_malformed_returns_none(text, problems):
    assert extract_answer(text) is None
    assert not is_correct(problems[0], text)
    check_solution_prefix(problems[0], text)  # must not raise


def test_extract_answer_tolerates_spacing():
    assert extract_answer("1+2=3\nAnswer:3") == 3
    assert extract_answer("  Answer:  -12  \nAnswer: 5") == -12


def test_tokenizer_round_trip_and_atomic_digits(problems, tok):
    assert tok.vocab_size <= 256
    for p in problems:
        text = p.prompt + p.solution
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(p.prompt) + tok.encode(p.solution) == ids
    for d in "0123456789":
        assert len(tok.encode(d)) == 1
    assert tok.encode("1234567890") == [tok.encode(d)[0] for d in "1234567890"]
    garbage = "Answer: ((x*?)) \t~{}|\\ \n\n 007"
    assert tok.decode(tok.encode(garbage)) == garbage


def test_auto_tokenizer_loads_shipped_folder():
    hf = AutoTokenizer.from_pretrained(str(ARITH_LM_DIR))
    assert hf.eos_token == EOS_TOKEN and hf.pad_token == "<|pad|>"
    assert hf.eos_token_id != hf.pad_token_id
    config = json.loads((ARITH_LM_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "Q: 12+7=?\n12+7=19\nAnswer: 19"
    ids = hf(text)["input_ids"]
    assert hf.decode(ids) == text and hf.eos_token_id not in ids


def test_newline_is_the_only_delimiter_token(tok):
    newline_pieces = [t for t in tok.hf.get_vocab() if "Ċ" in t]
    assert newline_pieces == ["Ċ"]
    assert tok.encode(STEP_DELIMITER * 3) == [tok.delimiter_id] * 3


def test_step_end_mask_finds_delimiters(problems, tok):
    for p in problems[:50]:
        ids, _ = arith_data.encode_sft_example(tok, p)
        prompt_len = len(tok.encode(p.prompt))
        mask = tok.step_end_mask(np.asarray(ids), start=prompt_len)
        ends = np.flatnonzero(mask)
        assert len(ends) == len(p.ops) + 1 and ids[ends[-1]] == tok.eos_id
        for pos in ends[:-1]:
            assert tok.decode(ids[: pos + 1]).endswith(STEP_DELIMITER)
        full = tok.step_end_mask(np.asarray(ids))
        assert np.flatnonzero(full).tolist() == [prompt_len - 1, *ends.tolist()]
    batch = arith_data.make_sft_batch(tok, problems[:4], max_len=128)
    starts = np.asarray([len(tok.encode(p.prompt)) for p in problems[:4]])
    assert tok.step_end_mask(batch.input_ids, starts).sum(-1).tolist() == [
        len(p.ops) + 1 for p in problems[:4]
    ]


def test_sft_batch(problems, tok):
    batch = arith_data.make_sft_batch(tok, problems[:8], max_len=128)
    assert batch.input_ids.shape == (8, 128) and batch.input_ids.dtype == np.int32
    for b, p in enumerate(problems[:8]):
        ids = batch.input_ids[b]
        assert tok.decode(ids[batch.loss_mask[b]]) == p.solution
        assert tok.decode(ids[batch.attention_mask[b] & ~batch.loss_mask[b]]) == p.prompt
        assert ids[batch.attention_mask[b]][-1] == tok.eos_id
        assert np.all(ids[~batch.attention_mask[b]] == tok.pad_id)
    with pytest.raises(ValueError):
        arith_data.make_sft_batch(tok, problems[:8], max_len=10)


def test_splits_are_disjoint_and_deterministic():
    train, held_out = arith_data.make_splits(2000, 200, ArithConfig(max_ops=3, max_operand=9))
    assert len(train) == 2000 and len(held_out) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert arith_data.make_splits(50, 10) == arith_data.make_splits(50, 10)


def test_prm_labels_on_sampled_completions(problems, tok):
    p = next(q for q in problems if len(q.ops) >= 4)
    lines = [*p.steps, p.answer_line]
    bad = lines.copy()
    bad[2] = "1+1=2"
    assert arith_data.prm_step_labels(p, STEP_DELIMITER.join(bad)) == [1, 1] + [0] * (len(bad) - 2)

    pad = [tok.pad_id] * 5
    finished = tok.encode(STEP_DELIMITER.join(bad)) + [tok.eos_id] + pad
    truncated = tok.encode(STEP_DELIMITER.join(lines)[:-1])  # last line unterminated
    trailing_newline = tok.encode(p.solution + STEP_DELIMITER) + [tok.eos_id]
    batch = arith_data.make_prm_batch(
        tok, [p, p, p], [finished, np.asarray(truncated), trailing_newline], max_len=160
    )
    labels = [batch.labels[b][batch.step_mask[b]].tolist() for b in range(3)]
    assert labels[0] == [1, 1] + [0] * (len(bad) - 2)
    assert labels[1] == [1] * len(p.ops)
    assert labels[2] == [1] * (len(p.ops) + 1)  # steps after the answer line carry no label
    assert not batch.attention_mask[0, -1] and batch.input_ids[0, -1] == tok.pad_id
    last_label = np.flatnonzero(batch.step_mask[0])[-1]
    assert batch.input_ids[0, last_label] == tok.eos_id
