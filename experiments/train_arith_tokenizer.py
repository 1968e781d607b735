"""Train the arithmetic task's byte-level BPE tokenizer and write it to tts_jax/assets/arith-lm/.

Usage: python experiments/train_arith_tokenizer.py [--out DIR] [--n-problems N]
"""

from __future__ import annotations

import argparse
import json
import pathlib

from tts_jax.tasks.arith_tokenizer import ARITH_LM_DIR, ArithTokenizer, train_tokenizer
from tts_jax.tasks.arithmetic import ArithConfig, generate_problems

# Seed of the tokenizer corpus; disjoint from the policy's train/eval seeds in arith_data.
CORPUS_SEED = 12345


def _use_portable_class_name(config_path: pathlib.Path) -> None:
    """Name the class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both resolve."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    """Train on prompts + solutions of generated problems (all difficulties' symbols) and save."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=ARITH_LM_DIR)
    parser.add_argument("--n-problems", type=int, default=2000)
    args = parser.parse_args()

    problems = generate_problems(args.n_problems, CORPUS_SEED, ArithConfig(mul_prob=0.3))
    tokenizer = train_tokenizer(p.prompt + p.solution for p in problems)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(args.out))
    _use_portable_class_name(args.out / "tokenizer_config.json")

    loaded = ArithTokenizer.load(args.out)
    vocab = sorted(loaded.hf.get_vocab().items(), key=lambda kv: kv[1])
    print(
        f"wrote {args.out}: vocab_size={loaded.vocab_size} eos={loaded.eos_id} "
        f"pad={loaded.pad_id} delimiter={loaded.delimiter_id}"
    )
    print("merged tokens:", [t for t, _ in vocab if len(t) > 1])


if __name__ == "__main__":
    main()
