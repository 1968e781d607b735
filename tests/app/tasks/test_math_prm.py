"""The Qwen2.5-Math-PRM input format and step rewards against the model card's PyTorch code."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import reference_step_rewards, shared_folders  # noqa: E402
from tts_jax.app.tasks.math import prm_format as F  # noqa: E402
from tts_jax.app.tasks.math import prompting as P  # noqa: E402
from tts_jax.models.lm_reward import load_reward_model  # noqa: E402

PROBLEM = "What is $1 + 2$?"
STEPS = ["The sum is $3$.", "Step 2: divide by 3.", "So the answer is $\\boxed{3}$."]


@pytest.fixture(scope="module")
def folders():
    return shared_folders()


@pytest.fixture(scope="module")
def prm(folders):
    config, model = load_reward_model(folders[1])
    assert model.num_labels == 2
    return model


def test_prm_conversation_is_the_model_card_format(folders):
    tok = P.load_tokenizer(folders[1])
    conv = F.prm_conversation(tok, PROBLEM, STEPS)
    reference = transformers.AutoTokenizer.from_pretrained(str(folders[1]))
    messages = [
        {"role": "system", "content": P.QWEN_MATH_SYSTEM},
        {"role": "user", "content": PROBLEM},
        {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"},
    ]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    expected = reference.encode(text)
    assert conv.ids.tolist() == expected
    step_id = reference.encode("<extra_0>")[0]
    np.testing.assert_array_equal(conv.step_mask, np.asarray(expected) == step_id)
    assert int(conv.step_mask.sum()) == 3
    with pytest.raises(ValueError, match="<extra_0>"):
        F.prm_conversation(P.load_tokenizer(folders[0]), PROBLEM, STEPS)


def test_step_rewards_equal_the_pytorch_reference(folders, prm):
    tok = P.load_tokenizer(folders[1])
    convs = [F.prm_conversation(tok, PROBLEM, STEPS), F.prm_conversation(tok, PROBLEM, STEPS[:1])]
    got = F.step_rewards(prm, convs, pad_id=tok.pad_token_id)
    for conv, rewards in zip(convs, got, strict=True):
        expected = reference_step_rewards(folders[1], conv.ids)
        assert rewards.shape == (len(expected),)
        np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], got[0][:1], atol=1e-5)  # causal: a prefix's scores
    assert np.ptp(got[0]) > 1e-3  # the random head separates the steps


def test_policy_completion_to_prm_input(folders, prm):
    policy_tok, prm_tok = P.load_tokenizer(folders[0]), P.load_tokenizer(folders[1])
    text = "\n\n".join(STEPS)  # the last step ends at EOS, not at a separator
    completion = P.encode(policy_tok, text) + [policy_tok.convert_tokens_to_ids("<|im_end|>")]
    enders = set(F.separator_token_ids(policy_tok))
    step_ends = np.asarray([i in enders for i in completion])
    assert step_ends.sum() == 2

    partial = F.policy_to_prm(policy_tok, prm_tok, PROBLEM, completion, step_ends)
    assert partial.ids.tolist() == F.prm_conversation(prm_tok, PROBLEM, STEPS[:2]).ids.tolist()
    full = F.policy_to_prm(policy_tok, prm_tok, PROBLEM, completion, step_ends, include_tail=True)
    assert full.ids.tolist() == F.prm_conversation(prm_tok, PROBLEM, STEPS).ids.tolist()
    by_text = F.policy_to_prm(policy_tok, prm_tok, PROBLEM, completion)
    assert by_text.ids.tolist() == full.ids.tolist()
    assert F.completion_steps(policy_tok, completion, step_ends) == STEPS[:2]

    rewards = F.step_rewards(prm, [full], pad_id=prm_tok.pad_token_id)[0]
    np.testing.assert_allclose(
        rewards, reference_step_rewards(folders[1], full.ids), atol=1e-4, rtol=0
    )


def test_pad_batch_buckets_lengths():
    a = F.PRMInput(np.arange(5, dtype=np.int32), np.arange(5) == 4)
    b = F.PRMInput(np.arange(70, dtype=np.int32), np.arange(70) % 10 == 9)
    ids, mask = F.pad_batch([a, b], pad_id=-1, multiple=64)
    assert ids.shape == (2, 128) and mask.sum() == 8 and (ids[0, 5:] == -1).all()


def test_host_fn_scores_policy_rows_at_their_marks(folders, prm):
    policy_tok, prm_tok = P.load_tokenizer(folders[0]), P.load_tokenizer(folders[1])
    prompt = P.build_prompt(policy_tok, PROBLEM)
    completion = P.encode(policy_tok, "\n\n".join(STEPS)) + [policy_tok.eos_token_id]
    enders = set(F.separator_token_ids(policy_tok))
    ends = [i in enders for i in completion[:-1]] + [True]  # the stop token ends the last step
    width = len(prompt) + len(completion) + 3
    tokens = np.zeros((3, width), np.int32)
    marks = np.zeros((3, width), bool)
    first_step = ends.index(True) + 1
    for r, cut in enumerate([len(completion), first_step, 0]):  # full, one step, no mark
        row = prompt + completion[:cut]
        tokens[r, : len(row)] = row
        marks[r, len(prompt) : len(row)] = ends[:cut]
    out = F.prm_host_fn(policy_tok, prm_tok, prm)(tokens, marks)
    assert (out[~marks] == 0).all() and (out[2] == 0).all()
    full = F.policy_to_prm(policy_tok, prm_tok, PROBLEM, completion, ends)
    np.testing.assert_allclose(
        out[0][marks[0]], reference_step_rewards(folders[1], full.ids), atol=1e-4, rtol=0
    )
    assert marks[1].sum() == 1 and marks[0].sum() == 3
    np.testing.assert_allclose(out[1][marks[1]], out[0][marks[0]][:1], atol=1e-5)
