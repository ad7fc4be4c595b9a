"""Training padding: the reference code's pad-to-512 vs dynamic padding (random and length-grouped).

    .venv/bin/python bench/padding.py runs/default/train_set.jsonl [--batch-size 4]

Tokenizes each row exactly as training does (chat template over prompt + completion) with the
student's tokenizer and prints one JSON line: rows, mean tokens, and the padding fraction of
each strategy (pad tokens / all tokens in the padded batches). Tokens per second of the real
run are in ``adapter-r1/training_config.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

from mapd_dspy.finetune.train import batches_in_order, padding_fraction, sampling_order
from mapd_dspy.models import resolve_model

REFERENCE_PAD_LENGTH = 512  # the reference code pads every example to 512 tokens


def token_lengths(rows: list[dict], tokenizer) -> list[int]:
    texts = [tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False) for row in rows]
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_set", type=Path)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.train_set.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    full_lengths = token_lengths(rows, tokenizer)
    # Training cuts examples at train.max_length (512 by default, the reference's length too), so
    # every strategy is compared on the same truncated examples.
    lengths = kept = [min(length, REFERENCE_PAD_LENGTH) for length in full_lengths]
    pad_to_512 = 1 - sum(kept) / (REFERENCE_PAD_LENGTH * len(kept))
    order_random = sampling_order(lengths, args.batch_size, group_by_length=False, seed=0)
    order_grouped = sampling_order(lengths, args.batch_size, group_by_length=True, seed=0)
    result = {
        "rows": len(rows),
        "mean_tokens_untruncated": round(sum(full_lengths) / len(full_lengths), 1),
        "mean_tokens": round(sum(lengths) / len(lengths), 1),
        "batch_size": args.batch_size,
        "padding_pad_to_512": round(pad_to_512, 3),
        "padding_dynamic_random": round(padding_fraction(batches_in_order(lengths, order_random, args.batch_size)), 3),
        "padding_dynamic_grouped": round(padding_fraction(batches_in_order(lengths, order_grouped, args.batch_size)), 3),
    }
    result["padded_tokens_ratio_512_vs_grouped"] = round(
        (REFERENCE_PAD_LENGTH * len(kept)) / sum(max(b) * len(b) for b in batches_in_order(lengths, order_grouped, args.batch_size)), 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
