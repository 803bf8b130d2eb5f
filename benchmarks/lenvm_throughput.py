"""LenVM training throughput against a plain forward + backward of the same backbone.

Both arms run the same batches (right-padded prompt + completion sequences from a rollout folder, or
synthetic ones), the same optimizer (AdamW) and the same autocast dtype; the LenVM arm adds the head,
the state gather and the token-mean value loss. A third arm trains only the top
``--top-layers`` decoder layers, the final norm and the head (``trainable_top_layers``), the CPU
recipe's mode. Reports the median tokens/s (non-padding tokens) of each arm over ``--steps`` timed
steps (after ``--warmup``) and the ratios, measured in one run.

    python benchmarks/lenvm_throughput.py --model smollm2-135m-instruct --rollouts runs/smollm2/rollouts
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from lenvm_rl.critic_metrics import collate_states
from lenvm_rl.loading import load_causal_lm, load_tokenizer
from lenvm_rl.modeling import LenVMModel


def batches(rows, batch_size, pad_token_id, count):
    for start in range(0, batch_size * count, batch_size):
        yield collate_states([rows[(start + i) % len(rows)] for i in range(batch_size)], pad_token_id)


def synthetic_rows(vocab_size, count, prompt_tokens=60, completion_tokens=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(completion_tokens // 2, completion_tokens * 3 // 2, (1,), generator=generator))
        ids = torch.randint(3, vocab_size, (prompt_tokens + length,), generator=generator).tolist()
        rows.append(
            {
                "prompt_ids": ids[:prompt_tokens],
                "completion_ids": ids[prompt_tokens:],
                "completion_tokens": length,
                "finished": True,
            }
        )
    return rows


def time_arm(step, inputs, warmup):
    timings = []
    for index, batch in enumerate(inputs):
        start = time.perf_counter()
        step(batch)
        if index >= warmup:
            timings.append(time.perf_counter() - start)
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rollouts", default=None, help="rollout folder; synthetic sequences when unset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"])
    parser.add_argument("--top-layers", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    if args.rollouts:
        from lenvm_rl.rollout_data import load_rollouts

        rows = [r for r in load_rollouts(args.rollouts) if r["finished"]]
    else:
        rows = synthetic_rows(len(tokenizer), 64)
    lenvm = LenVMModel.from_backbone(load_causal_lm(args.model), gamma=0.99)
    top = LenVMModel.from_backbone(load_causal_lm(args.model), gamma=0.99)
    top.backbone.requires_grad_(False)
    top.backbone.layers[-args.top_layers :].requires_grad_(True)
    top.backbone.norm.requires_grad_(True)
    plain = load_causal_lm(args.model).get_decoder()
    count = args.warmup + args.steps
    enabled = args.autocast != "none"

    def plain_step(batch, optimizer=torch.optim.AdamW(plain.parameters(), lr=1e-6)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            hidden = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = hidden.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def lenvm_step(batch, optimizer=torch.optim.AdamW(lenvm.parameters(), lr=1e-6)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = lenvm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def top_step(batch, optimizer=torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-6)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = top(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    tokens = [int(b["attention_mask"].sum()) for b in batches(rows, args.batch_size, tokenizer.pad_token_id, count)]
    results = {}
    # Interleave the arms in two rounds so drift in machine load hits both alike.
    for arm, step in [("plain", plain_step), ("lenvm", lenvm_step), ("top", top_step)] * 2:
        timings = time_arm(step, batches(rows, args.batch_size, tokenizer.pad_token_id, count), args.warmup)
        results.setdefault(arm, []).extend(t / n for t, n in zip(timings, tokens[args.warmup :]))
    plain_tps = 1 / statistics.median(results["plain"])
    lenvm_tps = 1 / statistics.median(results["lenvm"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"model {args.model}, batch {args.batch_size}, {len(results['plain'])} timed steps per arm, autocast {args.autocast}"
    )
    print(f"plain forward+backward: {plain_tps:,.0f} tokens/s (median)")
    print(f"LenVM training step:    {lenvm_tps:,.0f} tokens/s (median)")
    top_tps = 1 / statistics.median(results["top"])
    print(f"LenVM, top {args.top_layers} layers:    {top_tps:,.0f} tokens/s (median)")
    print(f"ratio LenVM / plain:    {lenvm_tps / plain_tps:.3f}")
    print(f"ratio top-layers LenVM / full LenVM: {top_tps / lenvm_tps:.2f}")


if __name__ == "__main__":
    main()
