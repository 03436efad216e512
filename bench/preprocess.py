"""Benchmark: WikiText-2 preprocessing (mindformers mode) against plain sentencepiece on all cores.

    .venv/bin/python bench/preprocess.py [--repeats 5] [--seq-length 4096]

Times, side by side and alternating, on wiki.train.tokens with the Llama 2 tokenizer:
  (a) the whole `preprocess_wiki`: read, detokenize, split on special tokens, encode, cut rows, write
      MindRecord, Parquet and manifest;
  (b) its tokenizer alone: `Tokenizer.encode_flat` (MindFormers' special-token handling, BOS/EOS) on the
      detokenized paragraphs;
  (c) sentencepiece's own threaded `encode(paragraphs, num_threads=cpu_count)` on the same paragraphs,
      the peer the goal is measured against. (b) beats it by encoding each distinct word once.
Prints medians and the ratios c/a and c/b of times (goal ≥ 0.8; MindFormers' own script manages about
0.1 end to end). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
TRAIN = DATA / "wikitext2" / "wiki.train.tokens"
TOKENIZER = DATA / "llama2_tokenizer" / "tokenizer.model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-length", type=int, default=4096)
    args = parser.parse_args()
    if not (TRAIN.is_file() and TOKENIZER.is_file()):
        print(f"skip: {TRAIN} or {TOKENIZER} is not here (the benchmark needs ../shared/data)")
        return 0

    import sentencepiece

    sys.path.insert(0, str(REPO))
    from llama.data.tokenizer import Tokenizer
    from llama.data.wiki import mindformers_paragraphs, preprocess_wiki

    paragraphs, _ = mindformers_paragraphs(TRAIN.read_text(encoding="utf-8"))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    tokenizer = Tokenizer(TOKENIZER)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = {
            "end to end": lambda: preprocess_wiki(TRAIN, TOKENIZER, args.seq_length, Path(tmp) / "wiki",
                                                  overwrite=True, show_progress=False)["stats"]["tokens"],
            "tokenizer": lambda: len(tokenizer.encode_flat(paragraphs, bos=True, eos=True)[0]),
            "plain sentencepiece": lambda: sum(map(len, sp.encode(paragraphs, num_threads=threads))),
        }
        seconds = {name: [] for name in work}
        tokens = {}
        for repeat in range(args.repeats + 1):  # round 0 warms caches and imports MindSpore, untimed
            for name, run in work.items():
                start = time.perf_counter()
                tokens[name] = run()
                seconds[name].append(time.perf_counter() - start)
            print(f"round {repeat}: " + "  ".join(f"{name} {times[-1]:.2f} s" for name, times in seconds.items()),
                  file=sys.stderr)
    median = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    print(f"wiki.train.tokens: {len(paragraphs):,} paragraphs, seq_length {args.seq_length}, {threads} cores, "
          f"median of {args.repeats}")
    for name, value in median.items():
        print(f"{name:>20}: {value:.3f} s  {tokens[name] / value:>12,.0f} tokens/s")
    plain = median["plain sentencepiece"]
    print(f"ratio plain/end-to-end: {plain / median['end to end']:.2f}   "
          f"ratio plain/tokenizer: {plain / median['tokenizer']:.2f}   (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
