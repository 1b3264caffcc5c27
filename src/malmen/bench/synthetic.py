"""Deterministic synthetic facts for speed and scale runs: any tokenizer, any number, streamed."""
from __future__ import annotations

import hashlib
from typing import Iterator

from ..facts import Fact

WORDS = ("red green blue yellow black white orange purple silver golden river mountain forest ocean desert "
         "island valley castle garden bridge tower harbor market temple palace village meadow canyon glacier "
         "falcon tiger wolf eagle dolphin panther lion bear otter heron").split()


def synthetic_facts(n: int, seed: int = 0) -> Iterator[Fact]:
    """``n`` facts 'The code word of item i is <word> <word>', with a rephrase and an unrelated prompt."""
    for i in range(n):
        h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
        a, b, c = WORDS[h[0] % len(WORDS)], WORDS[h[1] % len(WORDS)], WORDS[h[2] % len(WORDS)]
        yield Fact(prompt=f"The code word of item {i} is", target=f"{a} {b}",
                   rephrases=(f"Item {i} has the code word",),
                   locality_prompt=f"The colour of the {c} flag is", locality_answer=WORDS[h[3] % len(WORDS)],
                   uid=str(i))
