"""How a chat model's answers to held-out prompts relate to the data: measured, not eyeballed.

Two figures for the replies a model gives to the first user turn of each held-out conversation:

* **known-word rate**: the share of the reply's words that occur anywhere in the training split — noise
  (made-up subword strings) lowers it;
* **domain match**: each reply is matched to the training answer it shares the most rare words with
  (IDF-weighted overlap); the reply is *on topic* when that answer's domain (e.g. the chatterbot category)
  is the held-out conversation's domain. The same is computed for the reference answers (what the data
  itself allows) and for the chance level (two random domains agreeing), so the model's rate can be read
  between the two.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class ReplyScores:
    n: int
    known_word_rate: float
    domain_match: float
    reference_domain_match: float
    chance_domain_match: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AnswerIndex:
    """The training answers, for finding the one a text shares the most rare words with."""

    def __init__(self, answers: Sequence[tuple[str | None, str]]):
        self.domains = [d for d, _ in answers]
        self.sets = [set(words(a)) for _, a in answers]
        df = Counter(w for s in self.sets for w in s)
        n = max(len(self.sets), 1)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
        self.vocabulary = set(df)

    def nearest_domain(self, text: str) -> str | None:
        ws = set(words(text))
        best, best_score = None, 0.0
        for domain, s in zip(self.domains, self.sets, strict=True):
            shared = ws & s
            if not shared:
                continue
            # overlap weighted by rarity, normalised by both sizes (a cosine over binary IDF vectors)
            score = sum(self.idf[w] ** 2 for w in shared) / math.sqrt(
                sum(self.idf.get(w, 1.0) ** 2 for w in ws) * sum(self.idf[w] ** 2 for w in s)
            )
            if score > best_score:
                best, best_score = domain, score
        return best


def score_replies(train: Sequence[Any], held_out: Sequence[Any], replies: Sequence[str]) -> ReplyScores:
    """Score ``replies[i]``, the model's answer to the first user turn of ``held_out[i]``.

    ``train`` and ``held_out`` are conversations (``.messages`` with ``.role``/``.content``, ``.domain``).
    """
    if len(replies) != len(held_out):
        raise ValueError(f"{len(replies)} replies for {len(held_out)} held-out conversations")
    index = AnswerIndex([(c.domain, m.content) for c in train for m in c.messages if m.role == "assistant"])
    reply_words = [w for r in replies for w in words(r)]
    known = sum(w in index.vocabulary for w in reply_words) / max(len(reply_words), 1)

    def match_rate(texts: Sequence[str]) -> float:
        hits = sum(index.nearest_domain(t) == c.domain for t, c in zip(texts, held_out, strict=True))
        return hits / max(len(texts), 1)

    references = [next((m.content for m in c.messages if m.role == "assistant"), "") for c in held_out]
    train_domains = Counter(index.domains)
    test_domains = Counter(c.domain for c in held_out)
    n_train, n_test = max(sum(train_domains.values()), 1), max(len(held_out), 1)
    chance = sum(train_domains[d] / n_train * k / n_test for d, k in test_domains.items())
    return ReplyScores(
        n=len(replies),
        known_word_rate=known,
        domain_match=match_rate(replies),
        reference_domain_match=match_rate(references),
        chance_domain_match=chance,
    )


def held_out_prompts(test_path: str | Path, n: int) -> list[tuple[str, str]]:
    """The first user turn and its reference answer of ``n`` held-out conversations, spread over domains."""
    from .data import load_split

    convs = load_split(test_path)
    by_domain: dict[str | None, list] = {}
    for c in convs:
        by_domain.setdefault(c.domain, []).append(c)
    picked = []
    while len(picked) < n and any(by_domain.values()):
        for domain in sorted(by_domain, key=str):
            if by_domain[domain] and len(picked) < n:
                picked.append(by_domain[domain].pop(0))
    pairs = []
    for c in picked:
        user = next(m.content for m in c.messages if m.role == "user")
        ref = next((m.content for m in c.messages if m.role == "assistant"), "")
        pairs.append((user, ref))
    return pairs
