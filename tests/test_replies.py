"""The held-out reply scores the demo reports: exact values on a small hand-made dataset."""

from __future__ import annotations

import pytest

from gguf_factory.data import Conversation, Message
from gguf_factory.replies import AnswerIndex, score_replies, words


def conv(domain: str, user: str, assistant: str) -> Conversation:
    return Conversation([Message("user", user), Message("assistant", assistant)], domain=domain)


TRAIN = [
    conv("food", "What do you eat?", "I like pizza and pasta with cheese."),
    conv("food", "Favourite fruit?", "Bananas are my favourite fruit."),
    conv("sports", "Do you play football?", "I watch football every weekend."),
    conv("ai", "Are you a robot?", "I am an artificial intelligence program."),
]
TEST = [
    conv("food", "Do you like cheese?", "Cheese on pizza is great."),
    conv("sports", "Who won the football match?", "The home team won the match."),
    conv("ai", "Can robots think?", "Some artificial programs can reason."),
]


def test_words_lowercase_and_keep_contractions() -> None:
    assert words("I don't like PIZZA, 42 times!") == ["i", "don't", "like", "pizza", "times"]


def test_nearest_domain_prefers_rare_shared_words() -> None:
    index = AnswerIndex([(c.domain, c.messages[1].content) for c in TRAIN])
    # "i" is shared with three answers; "football" only with the sports one
    assert index.nearest_domain("i love football") == "sports"
    assert index.nearest_domain("artificial") == "ai"
    assert index.nearest_domain("zebra") is None


def test_scores_on_topic_noise_and_reference() -> None:
    replies = ["I like cheese and pizza.", "I am an artificial program.", "xqzv blorp artificial"]
    s = score_replies(TRAIN, TEST, replies)
    assert s.n == 3
    # 13 reply words (5 + 5 + 3), 2 unknown ("xqzv", "blorp")
    assert s.known_word_rate == pytest.approx(11 / 13)
    # reply 1 -> food (on topic), reply 2 -> ai but the prompt was sports (off), reply 3 -> ai (on topic)
    assert s.domain_match == pytest.approx(2 / 3)
    # references: pizza/cheese -> food, football-free "team won the match" -> no match, "artificial" -> ai
    assert s.reference_domain_match == pytest.approx(2 / 3)
    # train domains food 2/4, sports 1/4, ai 1/4; test one of each: (2/4 + 1/4 + 1/4) / 3
    assert s.chance_domain_match == pytest.approx(1 / 3)


def test_reply_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 replies for 3"):
        score_replies(TRAIN, TEST, ["a", "b"])
