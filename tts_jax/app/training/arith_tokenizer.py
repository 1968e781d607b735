"""Train the arithmetic task's byte-level BPE tokenizer (the tokenizer of ``arith-lm``).

Writes ``tokenizer.json`` + ``tokenizer_config.json`` and a training record
``tokenizer_training.json`` into ``--out`` (default ``outputs/train/arith-tokenizer``). With
``--install`` the two tokenizer files then replace those in ``tts_jax/assets/arith-lm/`` (the
policy's weights there are left alone, but they were trained with the old vocabulary: retrain
``arith-lm`` on the new tokenizer with
``python -m tts_jax.app.training.arith_lm --tokenizer DIR``). Without
``--install`` the package's assets are never written.

Usage: python -m tts_jax.app.training.arith_tokenizer [--out DIR] [--install] [--n-problems N]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import pathlib

from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer, train_tokenizer
from tts_jax.app.tasks.arithmetic import ArithConfig, generate_problems
from tts_jax.app.training.common import add_output_args, check_out, install_asset

NAME = "arith-tokenizer"
ASSET = "arith-lm"  # the tokenizer ships beside the policy's weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RECORD = "tokenizer_training.json"
# Seed of the tokenizer corpus; disjoint from the policy's train/eval seeds in arith_data.
CORPUS_SEED = 12345


def _use_portable_class_name(config_path: pathlib.Path) -> None:
    """Name the class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both resolve."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    """Train on prompts + solutions of generated problems (all difficulties' symbols) and save."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_output_args(parser, NAME, f"tts_jax/assets/{ASSET}/ ({', '.join(TOKENIZER_FILES)})")
    parser.add_argument("--n-problems", type=int, default=2000, help="corpus size (default 2000)")
    args = parser.parse_args()
    out = check_out(args.out)

    config = ArithConfig(mul_prob=0.3)
    problems = generate_problems(args.n_problems, CORPUS_SEED, config)
    tokenizer = train_tokenizer(p.prompt + p.solution for p in problems)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    _use_portable_class_name(out / "tokenizer_config.json")

    loaded = ArithTokenizer.load(out)
    vocab = sorted(loaded.hf.get_vocab().items(), key=lambda kv: kv[1])
    merged = [t for t, _ in vocab if len(t) > 1]
    record = {
        "corpus": "prompt + solution of generate_problems(n_problems, corpus_seed, config)",
        "n_problems": args.n_problems,
        "corpus_seed": CORPUS_SEED,
        "config": dataclasses.asdict(config),
        "vocab_size": loaded.vocab_size,
        "merged_tokens": merged,
        "versions": {p: importlib.metadata.version(p) for p in ("tokenizers", "transformers")},
        "script": "tts_jax.app.training.arith_tokenizer",
    }
    (out / RECORD).write_text(json.dumps(record, indent=2, default=repr) + "\n")
    print(
        f"wrote {out}: vocab_size={loaded.vocab_size} eos={loaded.eos_id} "
        f"pad={loaded.pad_id} delimiter={loaded.delimiter_id}"
    )
    print("merged tokens:", merged)
    if args.install:
        install_asset(out, ASSET, TOKENIZER_FILES)
    else:
        print(f"package assets untouched; rerun with --install to copy into assets/{ASSET}")


if __name__ == "__main__":
    main()
