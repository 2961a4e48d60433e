#!/usr/bin/env python
"""Train the bundled SentencePiece tokenizer used by ``probe-tiny-llama-32l``.

The tokenizer is trained from ``tools/tokenizer_corpus.txt`` (original mixed
English / Simplified Chinese text written for this project) and written to
``probe/assets/tokenizer.model``.  The settings mirror the LLaMA tokenizer
(BPE, byte fallback, split digits, identity normalisation, ``<unk>``/``<s>``/``</s>``
at ids 0/1/2, no pad piece) so that ``transformers.LlamaTokenizer`` can load it
and tokenise the same way a real LLaMA tokenizer would, only with a much smaller
vocabulary.

Usage::

    python tools/train_tokenizer.py            # (re)write probe/assets/tokenizer.model
    python tools/train_tokenizer.py --check    # verify the committed file is reproducible

Training is deterministic: BPE training in SentencePiece has no sampling step,
we additionally pin the random seed and use a single thread, and the serialized
model proto is written byte-for-byte, so re-running the script yields an
identical file.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import logging
import pathlib
import sys

import sentencepiece as spm

logger = logging.getLogger("train_tokenizer")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "tools" / "tokenizer_corpus.txt"
DEFAULT_OUTPUT = REPO_ROOT / "probe" / "assets" / "tokenizer.model"

# Why 3000: with the ~65 KB corpus, BPE merges up to roughly 3000 pieces are
# backed by pairs that recur several times in the corpus.  Beyond ~3200 the
# trainer starts merging pairs seen only once or twice (whole memorised
# phrases such as "我喜欢攀岩" becoming a single piece), which is overfitting
# rather than a useful vocabulary.  3000 is also a multiple of 8, which keeps
# the embedding / lm_head matmuls friendly to tensor cores.
DEFAULT_VOCAB_SIZE = 3000
SEED = 0


def read_corpus(path: pathlib.Path) -> list[str]:
    """Read the training corpus as a list of non-empty lines.

    Args:
        path: UTF-8 text file, one "sentence" per line.

    Returns:
        The non-blank lines, with trailing newlines stripped but inner
        whitespace (e.g. code indentation) preserved.
    """
    text = path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train(corpus: pathlib.Path, vocab_size: int) -> bytes:
    """Train the tokenizer and return the serialized SentencePiece model.

    Args:
        corpus: Path of the training text.
        vocab_size: Total vocabulary size, including the 3 special pieces and
            the 256 byte-fallback pieces.

    Returns:
        The serialized ``ModelProto`` bytes (the content of a ``.model`` file).
    """
    lines = read_corpus(corpus)
    spm.set_random_generator_seed(SEED)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",  # transformers' LlamaTokenizer (v5) is a BPE tokenizer
        vocab_size=vocab_size,
        character_coverage=1.0,  # keep every character seen, incl. rare hanzi
        byte_fallback=True,  # unseen characters become <0xNN> pieces, never <unk>
        split_digits=True,  # like LLaMA: numbers tokenise digit by digit
        # Identity normalisation and no whitespace folding: the HF tokenizer
        # has no normalizer, so this keeps spm and HF encodings identical.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # Like LLaMA: runs of spaces (code indentation) may become single pieces.
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def summarize(model: bytes, corpus: pathlib.Path) -> dict[str, object]:
    """Compute a few statistics used to judge whether the vocab size is sensible.

    Args:
        model: Serialized SentencePiece model.
        corpus: The training corpus (used to count piece usage).

    Returns:
        A dict with the vocab size, file size, the encoding of the reference
        prompt, and how many learned multi-character pieces occur at most twice
        when encoding the corpus (a proxy for overfitting).
    """
    sp = spm.SentencePieceProcessor(model_proto=model)
    lines = read_corpus(corpus)
    counts = collections.Counter(i for line in lines for i in sp.encode(line))
    learned = [
        i
        for i in range(sp.get_piece_size())
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
        and len(sp.id_to_piece(i).lstrip("\u2581")) > 1
    ]
    return {
        "vocab_size": sp.get_piece_size(),
        "bytes": len(model),
        "sha256": hashlib.sha256(model).hexdigest()[:16],
        "prompt_pieces": sp.encode("我喜欢攀岩", out_type=str),
        "prompt_ids": sp.encode("我喜欢攀岩"),
        "learned_pieces": len(learned),
        "learned_used_le2": sum(counts[i] <= 2 for i in learned),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (defaults to ``sys.argv[1:]``).

    Returns:
        Process exit code (0 on success, 1 when ``--check`` finds a mismatch).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=pathlib.Path, default=DEFAULT_CORPUS)
    parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the existing output differs from a fresh training run",
    )
    args = parser.parse_args(argv)

    model = train(args.corpus, args.vocab_size)
    stats = summarize(model, args.corpus)
    for key, value in stats.items():
        logger.info("%s: %s", key, value)

    if args.check:
        existing = args.output.read_bytes() if args.output.exists() else b""
        if existing != model:
            logger.error("%s is out of date; re-run tools/train_tokenizer.py", args.output)
            return 1
        logger.info("%s is up to date", args.output)
        return 0

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(model)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
