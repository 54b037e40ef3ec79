"""
Synthetic training examples of realistic lengths, for timing and counting FLOPs without the data files.

Rows of random ids whose lengths, in Llama-3 tokens, follow the official training sets: each part is a
clipped log-normal (median, sigma, low, high), then capped as data.build_training_sets caps it.
BENCHMARKS.md ("Lengths") gives the source of each number.
"""

import random

import data

TEMPLATE = 10  # chat template around one request
HARMFUL_REQUEST = (14, 0.35, 4, 100)
HARMFUL_RESPONSE = (300, 0.45, 20, 4000)
ULTRACHAT_WHOLE = (1100, 0.5, 60, 8000)
ULTRACHAT_REPLY = (350, 0.5, 10, 4000)
XSTEST_TURN = ((10, 0.2, 4, 20), (150, 0.6, 10, 256))  # request, completion
REFUSAL_TURN = (HARMFUL_REQUEST, (25, 0.3, 8, 80))
RETAIN_MIX = {"ultrachat": 10_000, "xstest": 230 * 50, "refusal": 2_000 * 2}  # as the official retain set


def synthetic_examples(cfg, n: int, vocab_size: int, seed: int):
    """n circuit-breaker and n retain examples (data.Example) of random ids, with the lengths above capped
    as data.build_training_sets caps them; cfg (a train.TrainConfig) gives the preset's recipe."""
    rng, caps = random.Random(seed), data.OFFICIAL_LENGTHS

    def draw(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(max(round(rng.lognormvariate(0.0, sigma) * median), low), high))

    def keep_request() -> bool:  # on every row for Mistral, on half of them for Llama-3
        return cfg.with_request == "always" or rng.random() < 0.5

    def turn(request: tuple, response: tuple) -> tuple[int, int]:
        return TEMPLATE + (draw(*request) if keep_request() else 0), draw(*response)

    def example(n_prompt: int, n_reply: int, cap: int) -> data.Example:
        n = min(n_prompt + n_reply, cap)
        return data.Example([rng.randrange(vocab_size) for _ in range(n)], min(n_prompt, n), [1] * n)

    def cb_example() -> data.Example:
        n_prompt, n_reply = turn(HARMFUL_REQUEST, HARMFUL_RESPONSE)
        return example(min(n_prompt, caps.request), min(n_reply, caps.response), caps.request + caps.response)

    def retain_example(kind: str) -> data.Example:
        if kind != "ultrachat":
            return example(*turn(*(XSTEST_TURN if kind == "xstest" else REFUSAL_TURN)), caps.retain)
        if keep_request():
            return example(draw(*ULTRACHAT_WHOLE), 0, caps.retain)  # the whole conversation is the "prompt"
        return example(TEMPLATE, draw(*ULTRACHAT_REPLY), caps.retain)

    mix = {k: v for k, v in RETAIN_MIX.items() if k != "refusal" or cfg.refusal_retain}
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return [cb_example() for _ in range(n)], [retain_example(k) for k in kinds]
