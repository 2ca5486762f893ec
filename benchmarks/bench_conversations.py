"""Follow-up turns of several conversations asked in turn, as a server's users ask them: time to the first token of
each follow-up, with the prefix cache holding the newest conversation only (`load(prefix_cache_bytes=0)`, the
Python default) and holding them all (`--budget`, 1 GiB by default; `serve` keeps a quarter of its KV space).

Each of `--conversations` conversations opens with its own random image and a question, then asks `--turns` - 1
follow-ups; the conversations take turns, so another one finishes a turn between any conversation's two. The image
feature cache is on in both runs (the images are not encoded again): the difference is the prompt's prefill. Both
runs are one process each on a preset's random checkpoint (benchmarks/checkpoints.py). The last line printed is JSON.

    python benchmarks/bench_conversations.py --preset medium
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import build_checkpoint  # noqa: E402

QUESTIONS = ["Describe the image.", "And the colours?", "What is in the corner?", "Anything else?"]


def run(directory: Path, budget: int, conversations: int, turns: int, dtype: str) -> dict:
    import numpy as np
    from PIL import Image

    import llava_next

    pipe = llava_next.load(directory, dtype=dtype, progress=False, prefix_cache_bytes=budget)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (336, 500, 3), dtype=np.uint8)) for _ in range(conversations)]
    chats = [pipe.conversation() for _ in images]
    first, follow = [], []
    for turn in range(turns):
        for chat, image in zip(chats, images):
            answer = chat.ask(QUESTIONS[turn % len(QUESTIONS)], images=[image] if turn == 0 else [], max_new_tokens=8)
            (follow if turn else first).append(answer.prefill_seconds)
    return {"prefix_cache_bytes": budget, "first_turn_s": statistics.median(first),
            "follow_up_s": statistics.median(follow), "follow_ups": [round(s, 4) for s in follow],
            "prefix": pipe.cache_stats()["prefix"]}


def main() -> None:
    parser = argparse.ArgumentParser(description="Follow-up turns of conversations that take turns, with a prefix "
                                                 "cache of the newest conversation only and of all of them.")
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--cache", default="/tmp/llava-next-bench", help="where preset checkpoints are built")
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--budget", type=int, default=2**30, help="prefix_cache_bytes of the second run (default "
                                                                   "1 GiB, room for every conversation here)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)  # (one run, in a process of its own)
    args = parser.parse_args()
    directory = build_checkpoint(Path(args.cache), args.preset)
    if args.run is not None:
        print(json.dumps(run(directory, args.run, args.conversations, args.turns, args.dtype)))
        return
    results = []
    for budget in (0, args.budget):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--run", str(budget)], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"prefix_cache_bytes {budget:>11}: first turn {r['first_turn_s']:.3f} s, follow-up "
              f"{r['follow_up_s']:.3f} s (median of {len(r['follow_ups'])}), prefix cache {r['prefix']}")
    print(f"follow-ups {results[0]['follow_up_s'] / results[1]['follow_up_s']:.1f}x faster with room for every "
          "conversation")
    print(json.dumps({"preset": args.preset, "conversations": args.conversations, "turns": args.turns,
                      "dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()
