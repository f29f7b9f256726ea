"""Build the OpenAI CLIP BPE tokenizer as a ``transformers.CLIPTokenizer`` folder, fully offline.

The only input is ``bpe_simple_vocab_16e6.txt.gz`` (MIT licence), which the ``open-clip-torch`` wheel ships.
Its first line is a header; the next 48,894 lines are the BPE merges in rank order. The 49,408-entry vocabulary
is then: the 256 byte-level symbols, the same 256 symbols with the end-of-word marker ``</w>``, one token per
merge (the two halves joined), and finally ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Usage::

    python benchmarks/build_tokenizer.py --out peft_lorsu/assets/clip-tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
from pathlib import Path

logger = logging.getLogger("build_tokenizer")

N_MERGES = 48_894  # 49408 - 2 * 256 byte symbols - 2 special tokens
VOCAB_SIZE = 49_408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHECK_TEXT = "a photo of a cat"
CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def byte_symbols() -> list[str]:
    """Return the 256 printable stand-ins for raw bytes used by byte-level BPE, in vocabulary order.

    Bytes that are already visible Latin-1 characters keep their own character; the remaining bytes (controls,
    space, soft hyphen, ...) are given the code points 256, 257, ... in increasing byte order. The vocabulary
    lists the visible bytes first, then the remapped ones.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in set(visible)]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package (without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "open-clip-torch is not installed: run `pip install --no-deps open-clip-torch==3.3.0` "
            "(or scripts/install_data.sh), or pass --bpe PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the open_clip package; pass --bpe PATH")
    return path


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """Read the first ``N_MERGES`` merge rules (after the header line) as (left, right) pairs."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != N_MERGES:
        raise ValueError(f"{bpe_path}: expected {N_MERGES} two-part merge lines, found {len(merges)} ({len(bad)} bad)")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Return the token -> id mapping (49,408 entries) built from the byte symbols and the merges."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def write_folder(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> None:
    """Write vocab.json, merges.txt and the tokenizer config into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_folder(out: Path) -> list[int]:
    """Load ``out`` with ``CLIPTokenizer.from_pretrained`` and verify the reference encoding."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out))
    ids = tok(CHECK_TEXT)["input_ids"]
    if ids != CHECK_IDS or len(tok) != VOCAB_SIZE:
        raise ValueError(f"tokenizer check failed: {CHECK_TEXT!r} -> {ids} (expected {CHECK_IDS}), size {len(tok)}")
    return ids


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("peft_lorsu/assets/clip-tokenizer"))
    parser.add_argument("--bpe", type=Path, default=None, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--max-length", type=int, default=77, help="model_max_length stored in the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    bpe_path = args.bpe or find_bpe_file()
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    write_folder(args.out, vocab, merges, args.max_length)
    ids = check_folder(args.out)
    logger.info("wrote %s (%d tokens, %d merges); %r -> %s", args.out, len(vocab), len(merges), CHECK_TEXT, ids)


if __name__ == "__main__":
    main()
