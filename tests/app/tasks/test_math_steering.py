"""The math task's pieces inside a sampler on the tiny Qwen2 policy and Qwen2.5-Math-PRM-format
folders: a merged ``".\\n\\n"``-style token ends a step, and a particle filter steered by the
incremental model-card PRM scorer reproduces the host scorer (whole conversation re-read at
every step) through its resamplings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(1)

from tests.lm_folders import shared_folders  # noqa: E402
from tts_jax.app.tasks.math import answers as A  # noqa: E402
from tts_jax.app.tasks.math import prm_format as F  # noqa: E402
from tts_jax.app.tasks.math import prompting as P  # noqa: E402
from tts_jax.models.lm import load_lm  # noqa: E402
from tts_jax.models.lm_reward import load_reward_model  # noqa: E402
from tts_jax.samplers.lm import particle_filter  # noqa: E402
from tts_jax.samplers.lm import state as lm_state  # noqa: E402
from tts_jax.samplers.lm.answers import extract_answers, select  # noqa: E402
from tts_jax.samplers.lm.scoring import host_scorer  # noqa: E402

PROBLEM = "What is $1 + 2$?"


@pytest.fixture(scope="module")
def setup():
    policy, prm_folder = shared_folders()
    policy_tok, prm_tok = P.load_tokenizer(policy), P.load_tokenizer(prm_folder)
    settings = P.read_generation_settings(policy, policy_tok)
    return policy_tok, prm_tok, load_lm(policy)[1], load_reward_model(prm_folder)[1], settings


def test_a_merged_separator_token_ends_a_step(setup):
    policy_tok, _, lm, _, settings = setup
    text = "The sum is $3$.\n\nStep 2: divide by 3."
    forced = P.encode(policy_tok, text)
    merged = forced.index(policy_tok.convert_tokens_to_ids("$.\u010a\u010a"))  # "$.\n\n"
    bare = F.step_separator_id(policy_tok)
    assert bare not in forced and bare in F.separator_token_ids(policy_tok)
    prompt = jnp.asarray(P.build_prompt(policy_tok, PROBLEM), jnp.int32)
    tokens = jnp.asarray(forced + [settings.pad_id] * (16 - len(forced)), jnp.int32)

    @jax.jit
    def first_step(lm, cfg):  # one compile: both separator sets have the same shape
        state = lm_state.init_state(lm, prompt, 1, 16, cfg.pad_id)
        forcing = jnp.ones((1,), bool)
        return lm_state.generate_step(lm, state, jax.random.key(0), cfg, 12, forcing, tokens)

    enders = F.separator_token_ids(policy_tok)
    ended = {}
    for name, separators in (("set", enders), ("bare", [bare] + [-1] * (len(enders) - 1))):
        cfg = lm_state.decode_config(1.0, separators, list(settings.stop_ids), settings.pad_id)
        state = first_step(lm, cfg)
        ended[name] = int(state.length[0]), np.flatnonzero(np.asarray(state.step_ends[0]))
    assert ended["set"][0] == merged + 1 and ended["set"][1].tolist() == [merged]
    assert ended["bare"][0] == 12 and ended["bare"][1].tolist() == [11]  # ran on to the limit


def test_particle_filter_incremental_prm_equals_the_host_prm(setup):
    policy_tok, prm_tok, lm, prm, settings = setup
    prompt = np.asarray(P.build_prompt(policy_tok, PROBLEM), np.int32)

    def run(scorer, params):
        return particle_filter.particle_filter(
            jax.random.key(0),
            lm,
            prompt,
            scorer,
            params,
            num_particles=4,
            max_steps=4,
            max_step_tokens=3,
            max_new_tokens=12,
            sep_ids=F.separator_token_ids(policy_tok),
            stop_ids=list(settings.stop_ids),
            pad_id=settings.pad_id,
            aggregation="min",
        )

    host = run(host_scorer(F.prm_host_fn(policy_tok, prm_tok, prm)), None)
    incremental = run(
        F.conversation_prm_scorer(policy_tok, prm_tok, token_ratio=2),
        F.conversation_params(prm, prm_tok, PROBLEM),
    )
    ancestors = np.asarray(host.info.ancestors)
    assert (ancestors != np.arange(4)).any()  # it resampled
    np.testing.assert_array_equal(incremental.info.ancestors, ancestors)
    np.testing.assert_array_equal(incremental.samples.tokens, host.samples.tokens)
    rewards = np.asarray(host.rewards)
    assert ((rewards > 0) & (rewards < 1)).all() and np.ptp(rewards) > 1e-4
    np.testing.assert_allclose(incremental.rewards, rewards, atol=1e-5, rtol=0)
    assert int(incremental.cost.reward_calls) == int(host.cost.reward_calls) > 0
    answers = extract_answers(host, lambda ids: A.completion_answer(policy_tok, ids))
    assert len(answers) == 4 and 0 <= select(host, A.majority, answers) < 4
