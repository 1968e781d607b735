"""The incremental model-card PRM scorer: the PRM sees exactly the tokens of
``prm_conversation`` up to the last ``<extra_0>`` at every step, and its step rewards equal the
full conversation's (JAX and the PyTorch reference), through a resampling permutation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import reference_step_rewards, shared_folders  # noqa: E402
from tts_jax.app.tasks.math import prm_format as F  # noqa: E402
from tts_jax.app.tasks.math import prompting as P  # noqa: E402
from tts_jax.models.lm_reward import load_reward_model  # noqa: E402
from tts_jax.particles import gather  # noqa: E402
from tts_jax.rewards.base import LAST, MIN, PROD  # noqa: E402

PROBLEM = "What is $1 + 2$?"
SOLUTIONS = (  # merged ".\n\n" / "$.\n\n" tokens end steps; the last step ends at the stop token
    "The sum is $3$.\n\nStep 2: divide by 3.\n\nSo the answer is $\\boxed{3}$.",
    "Let $x = 1$.\n\nThen $2x = 2$.\n\n\n\nWe get $3$.\n\nThe final answer is 3.",
    "Step 1: add the numbers.\n\nThe final answer is $\\boxed{3}$.",
)
L = 48


@pytest.fixture(scope="module")
def setup():
    policy, prm_folder = shared_folders()
    policy_tok, prm_tok = P.load_tokenizer(policy), P.load_tokenizer(prm_folder)
    enders = set(F.separator_token_ids(policy_tok))
    stop = policy_tok.convert_tokens_to_ids("<|im_end|>")
    tokens = np.full((len(SOLUTIONS), L), policy_tok.pad_token_id, np.int32)
    ends = np.zeros(tokens.shape, bool)
    for i, text in enumerate(SOLUTIONS):
        ids = P.encode(policy_tok, text) + [stop]
        tokens[i, : len(ids)] = ids
        ends[i, : len(ids)] = [t in enders for t in ids[:-1]] + [True]
    _, prm = load_reward_model(prm_folder)
    return policy_tok, prm_tok, prm, prm_folder, tokens, ends


def _steps(policy_tok, tokens, ends, k):
    """The first ``k`` steps of a row as the PRM conversation holds them."""
    return F.completion_steps(policy_tok, tokens, ends)[:k]


def test_every_step_prefix_is_the_model_card_conversation(setup):
    policy_tok, prm_tok, _, _, tokens, ends = setup
    parts = F.conversation_parts(prm_tok, PROBLEM)
    assert prm_tok.decode(parts.tail) == "<|im_end|>\n"  # text after the content is not fed
    for row in range(len(SOLUTIONS)):
        n_steps = int(ends[row].sum())
        assert n_steps >= 2
        fed, room = np.zeros(1, np.int32), np.asarray([10**6])
        encoded = list(parts.head)
        marks = np.flatnonzero(ends[row])
        for k in range(1, n_steps + 1):  # the host encoder, one step at a time
            length = np.asarray([marks[k - 1] + 1])
            ids, count, fed = F.new_steps_to_prm(
                policy_tok,
                prm_tok,
                tokens[row : row + 1],
                ends[row : row + 1],
                fed,
                length,
                room,
                64,
            )
            encoded += ids[0, : count[0]].tolist()
            full = F.prm_conversation(
                prm_tok, PROBLEM, _steps(policy_tok, tokens[row], ends[row], k)
            )
            assert full.ids.tolist() == encoded + parts.tail.tolist()  # token for token
            assert encoded[-1] == parts.step_token and int(fed[0]) == length[0]
            incremental = F.incremental_ids(
                prm_tok, PROBLEM, F.completion_steps(policy_tok, tokens[row], ends[row])[:k]
            )
            assert incremental.tolist() == encoded


def test_incremental_rewards_equal_the_full_conversation_through_resampling(setup):
    policy_tok, prm_tok, prm, folder, tokens, ends = setup
    scorer = F.conversation_prm_scorer(policy_tok, prm_tok)
    params = F.conversation_params(prm, prm_tok, PROBLEM)
    window = 24
    update = jax.jit(scorer.update, static_argnums=(5, 6))
    state = scorer.init(params, jnp.zeros((4,), jnp.int32), None, len(SOLUTIONS), L)
    marks = [np.flatnonzero(e) for e in ends]
    perm = np.asarray([2, 0, 0])  # a resampling: row 1 dropped, row 0 copied
    rows = np.arange(len(SOLUTIONS))  # which solution each particle holds
    seen = [[] for _ in rows]  # newest step reward after every update, per particle
    for k in range(1, 5):
        if k == 3:
            state, rows = gather(state, jnp.asarray(perm)), rows[perm]
            seen = [list(seen[j]) for j in perm]
        length = np.asarray([marks[r][min(k, len(marks[r])) - 1] + 1 for r in rows], np.int32)
        score, state = update(
            params,
            state,
            jnp.asarray(tokens[rows]),
            jnp.asarray(length),
            jnp.asarray(ends[rows]),
            window,
            LAST,
        )
        for i, r in enumerate(rows):
            if k <= len(marks[r]):
                seen[i].append(float(score[i]))
    for i, r in enumerate(rows):
        steps = F.completion_steps(policy_tok, tokens[r], ends[r])
        full = F.prm_conversation(prm_tok, PROBLEM, steps)
        expected = F.step_rewards(prm, [full], pad_id=prm_tok.pad_token_id)[0]
        np.testing.assert_allclose(seen[i], expected, atol=1e-5, rtol=0)
        for how, value in ((MIN, expected.min()), (PROD, expected.prod())):
            got = scorer.read(params, state, None, None, None, how)[i]
            np.testing.assert_allclose(float(got), value, atol=1e-5, rtol=1e-5)
    reference = reference_step_rewards(folder, full.ids)  # the model card's PyTorch code
    np.testing.assert_allclose(seen[-1], reference, atol=1e-4, rtol=0)
    assert np.ptp(seen[-1]) > 1e-3  # the random head separates the steps


def test_a_step_longer_than_the_bound_is_refused(setup):
    policy_tok, prm_tok, _, _, tokens, ends = setup
    length = np.asarray([np.flatnonzero(ends[0])[0] + 1])
    with pytest.raises(ValueError, match="token_ratio"):
        F.new_steps_to_prm(
            policy_tok, prm_tok, tokens[:1], ends[:1], np.zeros(1), length, np.asarray([100]), 4
        )
    with pytest.raises(ValueError, match="left in its PRM cache"):
        F.new_steps_to_prm(
            policy_tok, prm_tok, tokens[:1], ends[:1], np.zeros(1), length, np.asarray([3]), 64
        )
