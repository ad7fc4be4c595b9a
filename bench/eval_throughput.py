"""Student evaluation throughput: vLLM-CPU (batched server) vs transformers ``generate``.

    .venv/bin/python bench/eval_throughput.py [--questions 32] [--max-new-tokens 128] [--batch-size 8]

Same model (the embedded SmolLM2 student), same prompts (the student's DSPy solve prompt on
SVAMP test questions from ../shared/data), greedy decoding, in one run so the machine's noise
hits both. Prints one JSON line: tokens/s of each, the ratio, and how many answers agree.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mapd_dspy.models import resolve_model
from mapd_dspy.serving import VLLMServer
from mapd_dspy.signatures import SolveQuestion
from mapd_dspy.tasks import get_task


def prompts(task, examples) -> list[list[dict]]:
    signature = dspy.ChainOfThought(SolveQuestion).predict.signature
    adapter = dspy.JSONAdapter()
    return [adapter.format(signature, demos=[], inputs={"question": ex.question, "answer_format": task.answer_format})
            for ex in examples]


def run_transformers(model_dir: str, conversations, max_new_tokens: int, batch_size: int) -> tuple[list[str], int, float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts, tokens = [], 0
    started = time.perf_counter()
    for start in range(0, len(conversations), batch_size):
        batch = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations[start : start + batch_size]]
        inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for row in output[:, inputs["input_ids"].shape[1]:]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:  # count only what was generated before the end
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            tokens += len(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, tokens, time.perf_counter() - started


def run_vllm(model_dir: str, conversations, max_new_tokens: int) -> tuple[list[str], int, float]:
    with VLLMServer(model_dir, "bench", kv_cache_gib=2) as server, httpx.Client(timeout=600) as client:
        def complete(messages):
            body = {"model": "bench", "messages": messages, "temperature": 0, "max_tokens": max_new_tokens}
            reply = client.post(f"{server.api_base}/chat/completions", json=body).json()
            return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]

        complete(conversations[0])  # warm-up, not timed
        started = time.perf_counter()
        with ThreadPoolExecutor(len(conversations)) as pool:
            results = list(pool.map(complete, conversations))
        seconds = time.perf_counter() - started
    return [text for text, _ in results], sum(n for _, n in results), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="transformers generate batch size")
    args = parser.parse_args()
    task = get_task("svamp")
    examples = task.load("test")[: args.questions]
    conversations = prompts(task, examples)
    model_dir = resolve_model("embedded:smollm2-135m-instruct")
    hf_texts, hf_tokens, hf_seconds = run_transformers(model_dir, conversations, args.max_new_tokens, args.batch_size)
    vllm_texts, vllm_tokens, vllm_seconds = run_vllm(model_dir, conversations, args.max_new_tokens)
    hf_rate, vllm_rate = hf_tokens / hf_seconds, vllm_tokens / vllm_seconds
    same_answer = sum(task.extract_answer(a, ex) == task.extract_answer(b, ex)
                      for a, b, ex in zip(hf_texts, vllm_texts, examples))
    print(json.dumps({
        "questions": len(examples),
        "max_new_tokens": args.max_new_tokens,
        "transformers": {"batch_size": args.batch_size, "tokens": hf_tokens, "seconds": round(hf_seconds, 1),
                         "tokens_per_s": round(hf_rate, 1)},
        "vllm": {"concurrent": len(examples), "tokens": vllm_tokens, "seconds": round(vllm_seconds, 1),
                 "tokens_per_s": round(vllm_rate, 1)},
        "speedup_vllm_vs_transformers": round(vllm_rate / hf_rate, 2),
        "same_extracted_answer": f"{same_answer}/{len(examples)}",
        "identical_text": f"{sum(a.strip() == b.strip() for a, b in zip(hf_texts, vllm_texts))}/{len(examples)}",
    }))


if __name__ == "__main__":
    main()
