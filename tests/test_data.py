"""Tests for the ``prepare`` verb's API (gguf_factory.data): readers, corpus, dedupe, split, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from gguf_factory.data import (
    Conversation,
    DatasetStats,
    Message,
    load_dataset,
    load_split,
    prepare,
    read_chat_file,
    read_chatterbot_corpus,
    render_stats_table,
    split_conversations,
)
from gguf_factory.errors import DataError, FactoryError, InputError

# ------------------------------------------------------------------------------------- helpers


def row(*turns: tuple[str, str], domain: str | None = None) -> str:
    obj: dict = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if domain is not None:
        obj["domain"] = domain
    return json.dumps(obj, ensure_ascii=False)


def qa(q: str, a: str, domain: str | None = None) -> str:
    return row(("user", q), ("assistant", a), domain=domain)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def make_jsonl(path: Path, n: int, domains: tuple[str, ...] = ("a",)) -> Path:
    lines = [qa(f"question {i}", f"answer {i}", domain=domains[i % len(domains)]) for i in range(n)]
    return write(path, "\n".join(lines) + "\n")


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------- JSONL


def test_jsonl_reads_rows_normalises_and_tags(tmp_path: Path) -> None:
    f = write(
        tmp_path / "chat.jsonl",
        "\n".join(
            [
                row(("system", " Be brief. "), ("user", "  Hi\r\nthere  "), ("assistant", "Cafe\u0301!")),
                "",
                "   ",
                qa("2+2?", "4", domain="math"),
            ]
        )
        + "\n",
    )
    res = read_chat_file(f, domain="default")
    assert res.skipped == []
    first, second = res.conversations
    assert first.messages == [
        Message("system", "Be brief."),
        Message("user", "Hi\nthere"),
        Message("assistant", "Caf\u00e9!"),  # NFC
    ]
    assert first.domain == "default"  # the argument tags rows without their own domain
    assert first.source == f"{f}:1"
    assert second.domain == "math"
    assert second.source == f"{f}:4"  # blank lines still count


def test_json_array_file(tmp_path: Path) -> None:
    f = write(tmp_path / "chat.json", "[\n" + ",\n".join([qa("a", "b"), qa("c", "d")]) + "\n]\n")
    assert [c.messages[0].content for c in read_chat_file(f).conversations] == ["a", "c"]


BAD_JSONL_ROWS = [
    ('{"messages": [}', "invalid JSON"),
    ('{"prompt": "hi"}', 'missing "messages"'),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"messages": "hi"}', '"messages" must be a list'),
    (row(("user", "hi"), ("bot", "hello")), "unknown role 'bot'"),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}',
        "must be a string",
    ),
    (row(("user", "hi"), ("user", "anyone?")), "no assistant turn"),
    (row(("assistant", "hello")), "no user turn"),
    (row(("user", "hi"), ("assistant", "   ")), "empty content"),
    (row(("user", "hi"), ("assistant", "yo"), domain=None).replace("}]}", '}], "domain": 3}'), '"domain"'),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_JSONL_ROWS)
def test_jsonl_invalid_row_names_file_and_line(tmp_path: Path, bad: str, expected: str) -> None:
    f = write(tmp_path / "data.jsonl", "\n".join([qa("a", "b"), qa("c", "d"), bad, qa("e", "f")]) + "\n")
    with pytest.raises(DataError) as exc:
        read_chat_file(f)
    msg = str(exc.value)
    assert msg.startswith(f"{f}:3: "), msg
    assert expected in msg
    assert isinstance(exc.value, FactoryError)

    res = read_chat_file(f, skip_invalid=True)
    assert len(res.conversations) == 3
    assert len(res.skipped) == 1 and res.skipped[0].startswith(f"{f}:3: ")


def test_invalid_json_message_shape(tmp_path: Path) -> None:
    f = write(tmp_path / "data.jsonl", qa("a", "b") + "\n\n" + '{"messages": [1 2]}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: invalid JSON \(Expecting ',' delimiter"):
        read_chat_file(f)


def test_not_utf8_names_line(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    f.write_bytes(qa("a", "b").encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not UTF-8"):
        read_chat_file(f)


# ------------------------------------------------------------------------------------- CSV / TSV


@pytest.mark.parametrize(
    "header", ["question,answer", "Prompt,Response", "INPUT,OUTPUT", "user,assistant", "id,Question,Answer"]
)
def test_csv_header_variants(tmp_path: Path, header: str) -> None:
    extra = "7," if header.startswith("id,") else ""
    f = write(tmp_path / "pairs.csv", f"{header}\n{extra}Hello?,Hi there\n")
    (conv,) = read_chat_file(f).conversations
    assert conv.messages == [Message("user", "Hello?"), Message("assistant", "Hi there")]
    assert conv.source == f"{f}:2"


def test_csv_domain_column_quotes_and_multiline(tmp_path: Path) -> None:
    f = write(
        tmp_path / "pairs.csv",
        'question,answer,domain\n"Say ""hi""","Line one\nline two",greetings\n\nWhy?,Because,\n',
    )
    a, b = read_chat_file(f, domain="fallback").conversations
    assert a.messages[0].content == 'Say "hi"'
    assert a.messages[1].content == "Line one\nline two"
    assert a.domain == "greetings"
    assert b.domain == "fallback"  # empty domain cell
    assert b.source == f"{f}:5"  # after a two-line record and a blank line


def test_tsv(tmp_path: Path) -> None:
    f = write(tmp_path / "pairs.tsv", "question\tanswer\nWhat, exactly?\tThis, exactly.\n")
    (conv,) = read_chat_file(f).conversations
    assert conv.messages[0].content == "What, exactly?"


def test_csv_wrong_columns_names_found_and_expected(tmp_path: Path) -> None:
    f = write(tmp_path / "pairs.csv", "q,a\nhi,hello\n")
    with pytest.raises(DataError) as exc:
        read_chat_file(f)
    msg = str(exc.value)
    assert str(f) in msg and "'q', 'a'" in msg and "question,answer" in msg and "prompt,response" in msg


@pytest.mark.parametrize(
    ("body", "expected"),
    [("hi,\n", "empty 'answer' cell"), (" ,hello\n", "empty 'question' cell"), ("a,b,c\n", "3 fields")],
)
def test_csv_bad_row_names_line(tmp_path: Path, body: str, expected: str) -> None:
    f = write(tmp_path / "pairs.csv", "question,answer\nok,fine\n" + body + "more,rows\n")
    with pytest.raises(DataError, match=rf"pairs\.csv:3: .*{expected}"):
        read_chat_file(f)
    res = read_chat_file(f, skip_invalid=True)
    assert len(res.conversations) == 2 and len(res.skipped) == 1


# ------------------------------------------------------------------------------------- chatterbot YAML


YAML_FILE = """\
categories:
- small talk
conversations:
- - Hello
  - Hi!
- - How are you?
  - Fine.
  - Good to hear.
- - What is 6 times 7?
  - 42
- - Hi
  - - nested
    - list
- just a string
- - Lonely line
"""


def test_yaml_reader_alternates_roles_and_handles_odd_items(tmp_path: Path) -> None:
    f = write(tmp_path / "corpus.yml", YAML_FILE)
    with pytest.raises(DataError, match=r"corpus\.yml:11: line 2 is a list, not text"):
        read_chat_file(f)

    res = read_chat_file(f, skip_invalid=True)
    assert [c.source for c in res.conversations] == [f"{f}:4", f"{f}:6", f"{f}:9"]
    hello, how, calc = res.conversations
    assert [m.role for m in hello.messages] == ["user", "assistant"]
    assert how.messages == [Message("user", "How are you?"), Message("assistant", "Fine.")]
    assert res.unanswered_dropped == 1  # the trailing "Good to hear." had no reply
    assert calc.messages[1].content == "42"  # a YAML number is kept as the text written
    assert hello.domain == "small talk"  # first category when no domain is given
    assert len(res.skipped) == 3
    assert res.skipped[1].startswith(f"{f}:14: ") and "list of lines" in res.skipped[1]
    assert res.skipped[2].startswith(f"{f}:15: ") and "no assistant turn" in res.skipped[2]


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    f = write(
        tmp_path / "evil.yaml",
        "conversations:\n- - hi\n  - !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
        "- - ok\n  - fine\n",
    )
    with pytest.raises(DataError, match=r"evil\.yaml:2: line 2 is not text"):
        read_chat_file(f)
    assert len(read_chat_file(f, skip_invalid=True).conversations) == 1
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("conversations:\n- - a\n  - [b\n", r"bad\.yml:\d+: invalid YAML"),
        ("- - a\n  - b\n", r"bad\.yml:1: expected a chatterbot corpus"),
        ("categories: [x]\n", r"bad\.yml: no 'conversations:' key"),
        ("conversations:\n", r"no conversations found in .*bad\.yml"),
    ],
)
def test_yaml_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        read_chat_file(write(tmp_path / "bad.yml", text))


# ------------------------------------------------------------------------------------- file-level errors


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.yml"])
def test_empty_file_is_an_error(tmp_path: Path, name: str) -> None:
    f = write(tmp_path / name, "\n\n")
    with pytest.raises(DataError, match="no conversations found in .*" + name.replace(".", r"\.")):
        read_chat_file(f)


def test_all_rows_invalid_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.jsonl", "nope\n{}\n")
    with pytest.raises(DataError, match=r"no conversations found in .*bad\.jsonl \(2 invalid rows skipped\)"):
        read_chat_file(f, skip_invalid=True)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not found: .*nowhere\.jsonl"):
        read_chat_file(tmp_path / "nowhere.jsonl")
    with pytest.raises(InputError, match=r"unsupported chat data file type '\.txt'"):
        read_chat_file(write(tmp_path / "notes.txt", "hi"))


# ------------------------------------------------------------------------------------- bundled corpus


def test_bundled_chatterbot_corpus() -> None:
    res = read_chatterbot_corpus()
    domains = {c.domain for c in res.conversations}
    assert {"greetings", "ai", "trivia", "tech_support", "computers"} <= domains
    assert len(res.conversations) > 1500
    assert all(c.source.startswith("chatterbot:english/") for c in res.conversations)
    greet = next(c for c in res.conversations if c.domain == "greetings")
    assert (
        greet.messages[0] == Message("user", "Hello") and greet.source == "chatterbot:english/greetings.yml:4"
    )
    # the bundled data holds a few odd entries: skipped and counted, never fatal
    assert all(s.startswith("chatterbot:english/") for s in res.skipped)


def test_bundled_corpus_strict_mode_names_the_odd_entry() -> None:
    res = read_chatterbot_corpus(skip_invalid=True)
    if not res.skipped:
        pytest.skip("this chatterbot-corpus release has no invalid entries")
    with pytest.raises(DataError, match=r"chatterbot:english/\w+\.yml:\d+: "):
        read_chatterbot_corpus(skip_invalid=False)


def test_bundled_corpus_categories_and_errors() -> None:
    res = read_chatterbot_corpus(categories=["Greetings", "tech support"])
    assert {c.domain for c in res.conversations} == {"greetings", "tech_support"}
    with pytest.raises(InputError, match=r"no category 'nope' \(available: .*greetings"):
        read_chatterbot_corpus(categories=["nope"])
    with pytest.raises(InputError, match=r"no language 'klingon' \(available: .*english"):
        read_chatterbot_corpus("klingon")


def test_prepare_bundled_corpus(tmp_path: Path) -> None:
    res = prepare(None, tmp_path / "ds")
    stats = res.stats
    assert "greetings" in stats.domains and "trivia" in stats.domains
    assert 500 < stats.conversations["total"] < stats.read
    assert stats.duplicates_dropped > 0  # tech_support repeats the same pairs many times
    assert stats.conversations["val"] > 0 and stats.conversations["test"] > 0
    assert stats.invalid_skipped == len(res.skipped)
    assert listing(res.out_dir) == ["stats.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert json.loads((res.out_dir / "stats.json").read_text()) == stats.to_json()
    ds = load_dataset(res.out_dir)
    assert {k: len(v) for k, v in ds.items()} == {s: stats.conversations[s] for s in ("train", "val", "test")}

    table = render_stats_table(stats)
    assert table.row_count == len(stats.domains) + 1
    console = Console(record=True, width=120)
    console.print(table)
    assert "greetings" in console.export_text()


# ------------------------------------------------------------------------------------- dedupe, split


def test_dedupe_across_files_counts_and_keeps_first(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", "\n".join([qa("hi", "hello", "x"), qa("hi", "hello", "y"), qa("q", "r")]))
    b = write(tmp_path / "b.csv", "question,answer\n  hi ,hello\nnew,one\n")
    res = prepare([a, b], tmp_path / "out")
    assert res.stats.read == 5
    assert res.stats.duplicates_dropped == 2
    assert res.stats.conversations["total"] == 3
    everything = [c for split in load_dataset(res.out_dir).values() for c in split]
    kept = next(c for c in everything if c.messages[0].content == "hi")
    assert kept.domain == "x" and kept.source == f"{a}:1"


def test_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    src = make_jsonl(tmp_path / "data.jsonl", 200, domains=("a", "b", "c", "d"))
    r1 = prepare([src], tmp_path / "one", seed=7)
    r2 = prepare([src], tmp_path / "two", seed=7)
    r3 = prepare([src], tmp_path / "three", seed=8)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (r1.out_dir / name).read_bytes() == (r2.out_dir / name).read_bytes()
    assert (r1.out_dir / "val.jsonl").read_bytes() != (r3.out_dir / "val.jsonl").read_bytes()

    ds = load_dataset(r1.out_dir)
    keys = {s: {c.key for c in ds[s]} for s in ds}
    assert (
        not keys["train"] & keys["val"]
        and not keys["train"] & keys["test"]
        and not keys["val"] & keys["test"]
    )
    assert len(keys["train"] | keys["val"] | keys["test"]) == 200
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (160, 20, 20)
    # stratified: each domain (50 conversations) gives 5 to val and 5 to test
    assert all(c == {"train": 40, "val": 5, "test": 5, "total": 50} for c in r1.stats.domains.values())


def test_split_small_and_uneven_domains() -> None:
    convs = [
        Conversation([Message("user", f"q{i}"), Message("assistant", "a")], domain="big") for i in range(40)
    ]
    convs += [
        Conversation([Message("user", f"t{i}"), Message("assistant", "a")], domain="tiny") for i in range(2)
    ]
    out = split_conversations(convs, seed=1)
    assert sum(map(len, out.values())) == 42
    assert len(out["val"]) == 4 and len(out["test"]) == 4
    assert any(c.domain == "tiny" for c in out["train"])  # a tiny domain keeps its training example


@pytest.mark.parametrize(("n", "expected"), [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (8, 1, 1))])
def test_split_sizes_for_small_datasets(n: int, expected: tuple[int, int, int]) -> None:
    convs = [
        Conversation([Message("user", f"q{i}"), Message("assistant", "a")], domain=f"d{i}") for i in range(n)
    ]
    out = split_conversations(convs)
    assert (len(out["train"]), len(out["val"]), len(out["test"])) == expected


def test_zero_fractions_and_invalid_fractions(tmp_path: Path) -> None:
    src = make_jsonl(tmp_path / "data.jsonl", 20)
    res = prepare([src], tmp_path / "out", val_fraction=0, test_fraction=0)
    assert res.stats.conversations == {"train": 20, "val": 0, "test": 0, "total": 20}
    assert load_split(res.val_path) == []
    with pytest.raises(InputError, match="val_fraction"):
        prepare([src], tmp_path / "bad", val_fraction=1.5)
    with pytest.raises(InputError, match="below 1"):
        prepare([src], tmp_path / "bad", val_fraction=0.5, test_fraction=0.5)


# ------------------------------------------------------------------------------------- prepare I/O


def test_prepare_folder_source_and_chatterbot_spec(tmp_path: Path) -> None:
    folder = tmp_path / "chats"
    folder.mkdir()
    make_jsonl(folder / "one.jsonl", 5, domains=("mine",))
    write(folder / "two.csv", "question,answer\nx,y\n")
    write(folder / "README.md", "ignored")
    res = prepare([folder, "chatterbot"], tmp_path / "out", categories=["greetings"])
    assert set(res.stats.domains) == {"mine", "(none)", "greetings"}


def test_prepare_failure_leaves_no_output(tmp_path: Path) -> None:
    good = make_jsonl(tmp_path / "good.jsonl", 10)
    bad = write(tmp_path / "bad.jsonl", qa("a", "b") + "\nnot json\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare([good, bad], out)
    assert listing(out) == []
    with pytest.raises(InputError, match=r"missing\.jsonl"):
        prepare([good, tmp_path / "missing.jsonl"], out)
    assert listing(out) == []

    # a previous dataset is left intact when a later run fails
    prepare([good], out)
    before = {n: (out / n).read_bytes() for n in listing(out)}
    with pytest.raises(DataError):
        prepare([bad], out)
    assert {n: (out / n).read_bytes() for n in listing(out)} == before


def test_prepare_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    good = make_jsonl(tmp_path / "good.jsonl", 10)
    out = tmp_path / "out"
    (out / "stats.json").mkdir(parents=True)  # the last output cannot be written
    with pytest.raises(InputError, match="stats.json"):
        prepare([good], out)
    assert listing(out) == ["stats.json"]  # no train/val/test, no leftover temporary files


def test_prepare_output_parent_must_exist(tmp_path: Path) -> None:
    good = make_jsonl(tmp_path / "good.jsonl", 10)
    with pytest.raises(InputError, match="parent does not exist"):
        prepare([good], tmp_path / "no" / "such" / "dir")


# ------------------------------------------------------------------------------------- loading


def test_conversation_json_roundtrip() -> None:
    conv = Conversation([Message("user", "hi"), Message("assistant", "hello")], domain="g", source="f:1")
    assert Conversation.from_json(conv.to_json()) == conv
    assert Conversation.from_json(json.loads(json.dumps(conv.to_json()))) == conv
    with pytest.raises(DataError, match="no assistant turn"):
        Conversation.from_json({"messages": [{"role": "user", "content": "hi"}]})


def test_load_dataset_errors(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", qa("a", "b") + "\n")
    with pytest.raises(DataError, match=r"not a prepared dataset: missing val\.jsonl, test\.jsonl"):
        load_dataset(d)
    with pytest.raises(InputError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")
    write(d / "val.jsonl", "")
    write(d / "test.jsonl", qa("a", "b") + "\n" + '{"messages": []}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: \"messages\" is empty"):
        load_dataset(d)


def test_stats_json_roundtrip(tmp_path: Path) -> None:
    res = prepare([make_jsonl(tmp_path / "d.jsonl", 12, domains=("x", "y"))], tmp_path / "out")
    assert DatasetStats.from_json(json.loads(res.stats_path.read_text())) == res.stats
    assert res.stats.avg_turns == 2.0 and res.stats.messages == 24
