"""Can the embedded model bind an answer letter to the choice it names? A supervised probe.

Warm-starts a fresh embedded policy (tokenizer trained on the data, as `make run` does) with
`warmstart.supervised_warm_start(teach=...)` and, every `--every` steps, decodes the eval rows greedily:
`agreement` is the share of answers whose letter is the choice the think names (the copy), `accuracy`
the share that is right, `format` TRL's think format. With `teach="format"` the targets name a uniformly
drawn choice, so accuracy stays at chance unless the model learned the task on its own.

    python -m benchmarks.copy_probe --dataset /tmp/unseen --steps 300 --every 100 --teach format
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch

from dapo_ops.config.dapo import EMBEDDED
from dapo_ops.data import loading as data
from dapo_ops.data import synthetic
from dapo_ops.models import inputs
from dapo_ops.models import loading as models
from dapo_ops.rl import rewards
from dapo_ops.rollout import generate as rollout
from dapo_ops.train import warmstart


def _split(dataset: str, split: str, tasks: list[str], n: int, seed: int) -> pl.DataFrame:
    if dataset == EMBEDDED:
        return synthetic.generate_rows(n, 2 * seed + (split == "eval"), tasks=tasks)
    name = {"train": "train", "eval": "validation"}[split]
    path = Path(dataset) / f"{name}.parquet"
    return pl.read_parquet(path).head(n)


def _named(completion: str, choices: list[str]) -> int | None:
    think = completion.partition("</think>")[0]
    return rewards._unique_verbatim_choice(think, choices)  # noqa: SLF001 - the same rule the reward uses


def measure(policy: models.Policy, rows: pl.DataFrame, max_len: int) -> dict[str, float]:
    """Greedy format, accuracy, letter/name agreement and chance on `rows`."""
    choices = [list(c) for c in rows["choices"].to_list()]
    prompts = inputs.encode_prompts(policy, rows["question"].to_list(), choices,
                                    [data.decode_image(im) if isinstance(im, bytes) else inputs.to_pil(im)
                                     for im in rows["image"].to_list()])
    batch = rollout.generate_rollouts(policy, prompts, num_generations=1, max_completion_length=max_len,
                                      temperature=0.0)
    labels = rows["correct_choice_idx"].to_list()
    right = rewards.mc_idx_reward(batch.completions, correct_choice_idx=labels, choices=choices)
    fmt = rewards.think_format_reward(batch.completions)
    pairs = []
    for text, ch in zip(batch.completions, choices, strict=True):
        letter = rewards.extract_choice(text.partition("</think>")[2], len(ch))
        pairs.append((letter, _named(text, ch)))
    both = [(a, b) for a, b in pairs if a is not None and b is not None]
    return {
        "format": sum(fmt) / len(fmt),
        "accuracy": sum(right) / len(right),
        "agreement": sum(a == b for a, b in both) / max(1, len(both)),
        "named_right": sum(b == y for (_, b), y in zip(pairs, labels, strict=True)) / len(pairs),
        "chance": sum(1 / len(c) for c in choices) / len(choices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=EMBEDDED)
    parser.add_argument("--tasks", default="color")
    parser.add_argument("--teach", default="format", choices=("format", "task"))
    parser.add_argument("--answer", default="letter", choices=("letter", "choice"))
    parser.add_argument("--pixels", type=int, default=models.EMBEDDED_IMAGE_PIXELS, help="image area (56*56: 4 tokens)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="{}", help='tiny_config overrides as JSON, e.g. {"num_hidden_layers": 6}')
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    train = _split(args.dataset, "train", tasks, 2048, args.seed)
    evals = _split(args.dataset, "eval", tasks, args.eval_rows, args.seed)
    corpus = list(synthetic.corpus())
    if args.dataset != EMBEDDED:
        corpus += train["question"].to_list() + [" ".join(c) for c in train["choices"].to_list()]
        corpus += [r for rs in train["rationales"].to_list() for r in rs]
    torch.manual_seed(args.seed)
    policy = models.build_embedded_policy(corpus, seed=args.seed, **json.loads(args.model))
    policy.processor.image_processor = models.build_image_processor(args.pixels)
    print(f"{sum(p.numel() for p in policy.model.parameters()):,} parameters", flush=True)
    start = time.perf_counter()
    done = 0
    while done < args.steps:
        losses = warmstart.supervised_warm_start(policy, train, steps=args.every, learning_rate=args.lr,
                                                 batch_size=args.batch_size, seed=args.seed + done,
                                                 teach=args.teach, answer=args.answer)
        done += args.every
        result = measure(policy, evals, args.max_len)
        print(json.dumps({"steps": done, "loss": round(losses[-1], 3), "seconds": round(time.perf_counter() - start),
                          **{k: round(v, 3) for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
