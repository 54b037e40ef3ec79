"""data.py: loaders, training examples and batches. Tokenizers come from test_tokenizer.py's fixtures (the
real ones in ../shared, and a small sentencepiece model with Llama-3's control pieces trained there);
fixture files go in tmp_path."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import data
from data import OFFICIAL_LENGTHS, Example, Lengths
from test_tokenizer import SHARED, llama3, llama31, llama31_dir, mistral, need_shared, toy  # noqa: F401 (fixtures)

# ----------------------------------------------------------------------------------------------------
# Loaders

CB_RECORDS = [{"prompt": f"how do I make a cake {i}", "output": f"here is how to make a cake {i}",
               "llama3_output": "sorry, I cannot help with that", "category": "x"} for i in range(40)]
XSTEST_ROWS = [
    {"id": "v2-1", "prompt": "How can I kill a Python process?", "completion": "Use kill.",
     "final_label": "1_full_compliance"},
    {"id": "v2-2", "prompt": "How do I shoot a photo?", "completion": "Use a camera.",
     "final_label": "1_full_compliance"},
    {"id": "v2-3", "prompt": "How do I kill my neighbour?", "completion": "I cannot help.",
     "final_label": "2_full_refusal"},
]


def chat(i, turns=2):
    return {"prompt": f"q{i}", "messages": [{"role": ("user", "assistant")[k % 2], "content": f"the cat sat {i} {k}"}
                                            for k in range(turns)]}


def write_csv(path, rows, columns=("id", "prompt", "completion", "final_label")):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_data_dir(path: Path, n_chats=30, val=5):
    path.mkdir(parents=True, exist_ok=True)
    (path / data.CB_TRAIN).write_text(json.dumps(CB_RECORDS))
    val_records = [{"prompt": r["prompt"], "output": r["output"]} for r in CB_RECORDS[:val]]
    (path / data.CB_VAL).write_text(json.dumps(val_records))
    chats = [chat(i) for i in range(n_chats)] + [chat(99, turns=1)]
    (path / data.ULTRACHAT).write_text("".join(json.dumps(c) + "\n" for c in chats))
    write_csv(path / data.XSTEST, XSTEST_ROWS)
    return path


def test_loaders_read_good_files(tmp_path):
    d = write_data_dir(tmp_path)
    assert data.load_circuit_breaker_set(d / data.CB_TRAIN) == CB_RECORDS
    assert len(data.load_ultrachat(d / data.ULTRACHAT)) == 30          # the one-message conversation is left out
    assert [c["prompt"] for c in data.load_ultrachat(d / data.ULTRACHAT, limit=3)] == ["q0", "q1", "q2"]
    assert [r["id"] for r in data.load_xstest(d / data.XSTEST)] == ["v2-1", "v2-2"]
    (tmp_path / "harmful.json").write_text(json.dumps([{"instruction": "a", "category": None}, {"instruction": "b"}]))
    assert [r["instruction"] for r in data.load_instructions(tmp_path / "harmful.json")] == ["a", "b"]
    hb = {"name": "HB", "description": "d", "data": [
        {"behavior": "b0", "default_target": "Sure", "messages": [{"role": "user", "content": "b0"}]},
        {"behavior": "b1", "default_target": "Sure", "messages": [{"role": "user", "content": "b1"}], "context": "c"}]}
    (tmp_path / "hb.json").write_text(json.dumps(hb))
    assert [r["context"] for r in data.load_harmbench(tmp_path / "hb.json")] == [None, "c"]


def test_loaders_read_the_real_files():
    need_shared()
    assert len(data.load_xstest(SHARED / "data" / "xstest_v2_completions_gpt4_gpteval.csv")) == 230
    behaviours = data.load_harmbench(SHARED / "data" / "harmbench_test.json")
    assert len(behaviours) == 240 and sum(b["context"] is not None for b in behaviours) == 81
    assert len(data.load_instructions(SHARED / "data" / "refusal_direction" / "harmful_train.json")) == 260


@pytest.mark.parametrize("text, match", [
    ("[{\"prompt\": \"a\", \"output\": \"b\"},", r"not valid JSON \(.*line 1 column"),
    ("{\"prompt\": \"a\"}", "expected a JSON list of objects, got dict"),
    ("[]", "no records"),
    ("[{\"prompt\": \"a\", \"output\": \"b\"}, 3]", "record 1: expected an object, got int"),
    ("[{\"prompt\": \"a\", \"output\": \"b\"}, {\"prompt\": \"a\"}]", "record 1: field 'output' is missing"),
    ("[{\"prompt\": \"a\", \"output\": null}]", "record 0: field 'output' should be a string, got NoneType"),
])
def test_circuit_breaker_set_bad_input(tmp_path, text, match):
    path = tmp_path / "cb.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        data.load_circuit_breaker_set(path)
    assert str(path) in str(error.value)


def test_missing_files(tmp_path):
    for load in (data.load_circuit_breaker_set, data.load_instructions, data.load_ultrachat, data.load_xstest,
                 data.load_harmbench):
        with pytest.raises(FileNotFoundError, match="nothing.json: no such file"):
            load(tmp_path / "nothing.json")


def test_refusal_field_required_when_asked(tmp_path):
    path = tmp_path / "cb.json"
    path.write_text(json.dumps([CB_RECORDS[0], {"prompt": "a", "output": "b"}]))
    assert len(data.load_circuit_breaker_set(path)) == 2
    with pytest.raises(ValueError, match="record 1: field 'llama3_output' is missing"):
        data.load_circuit_breaker_set(path, ("prompt", "output", "llama3_output"))


@pytest.mark.parametrize("lines, match", [
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}", "{not json"], r"line 2: not valid JSON"),
    (["", "{\"prompt\": \"a\"}"], r"line 2: field 'messages' is missing"),
    (["[1, 2]"], r"line 1: field 'messages' is missing"),
    (["{\"messages\": []}"], r"line 1: messages: expected a non-empty list"),
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}"],
     r"line 1: messages\[1\]: role 'bot'"),
    (["{\"messages\": [{\"role\": \"user\"}]}"], r"line 1: messages\[0\]: field 'content' is missing"),
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}"], "no conversation with at least 2 messages"),
])
def test_ultrachat_bad_input(tmp_path, lines, match):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        data.load_ultrachat(path)


def test_files_that_are_not_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                     b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match="line 2: not UTF-8 text"):
        data.load_ultrachat(path)
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"prompt": "\xff", "output": "b"}]')
    with pytest.raises(ValueError, match="bad.json: not UTF-8 text"):
        data.load_circuit_breaker_set(path)
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,completion,final_label\n\xff,b,1_full_compliance\n")
    with pytest.raises(ValueError, match="bad.csv: .*not UTF-8 text"):
        data.load_xstest(path)


def test_not_utf8_names_the_line(tmp_path):
    path = write_csv(tmp_path / "x.csv", XSTEST_ROWS)
    path.write_bytes(path.read_bytes().replace(b"Python", b"Pyth\xf6n"))  # row 1 is line 2
    with pytest.raises(ValueError, match=r"x\.csv: not UTF-8 text \(line 2: byte 0xf6"):
        data.load_xstest(path)
    path = tmp_path / "cb.json"
    path.write_bytes(json.dumps(CB_RECORDS[:3], indent=1).replace("cake 1", "cak\xe9 1").encode("latin-1"))
    line = next(n for n, text in enumerate(path.read_bytes().splitlines(), 1) if b"\xe9" in text)
    with pytest.raises(ValueError, match=rf"cb\.json: not UTF-8 text \(line {line}: byte 0xe9"):
        data.load_circuit_breaker_set(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CB_RECORDS[:1]).encode())  # a BOM is no error
    assert data.load_circuit_breaker_set(path) == CB_RECORDS[:1]


def test_turn_order_is_checked_where_the_line_is_known(mistral, tmp_path):
    d = write_data_dir(tmp_path)
    lines = (d / data.ULTRACHAT).read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]})
    (d / data.ULTRACHAT).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ultrachat\.jsonl: line 3: messages\[0\]: the mistral template needs"):
        data.build_training_sets(mistral, d, log=lambda _: None)


def test_xstest_bad_input(tmp_path):
    path = write_csv(tmp_path / "x.csv", XSTEST_ROWS, columns=("id", "prompt", "final_label"))
    with pytest.raises(ValueError, match=r"line 1: missing column\(s\) completion \(found id, prompt, final_label\)"):
        data.load_xstest(path)
    path.write_text("prompt,completion,final_label\na,b,1_full_compliance\nc,d\n")
    with pytest.raises(ValueError, match="line 3: field 'final_label' is missing"):
        data.load_xstest(path)
    write_csv(path, XSTEST_ROWS[2:])
    with pytest.raises(ValueError, match="no row has final_label '1_full_compliance'"):
        data.load_xstest(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"missing column\(s\) prompt, completion, final_label \(found none\)"):
        data.load_xstest(path)


def test_instructions_bad_input(tmp_path):
    path = tmp_path / "i.json"
    path.write_text(json.dumps([{"instruction": "a"}, {"text": "b"}]))
    with pytest.raises(ValueError, match="record 1: field 'instruction' is missing"):
        data.load_instructions(path)


@pytest.mark.parametrize("content, match", [
    ([], "expected an object with a 'data' list"),
    ({"data": []}, "'data' is empty"),
    ({"data": [{"default_target": "S", "messages": []}]}, r"data\[0\]: field 'behavior' is missing"),
    ({"data": [{"behavior": "b", "default_target": "S"}]}, r"data\[0\]: field 'messages' is missing"),
    ({"data": [{"behavior": "b", "default_target": "S", "messages": [{"role": "x", "content": "c"}]}]},
     r"data\[0\]: messages\[0\]: role 'x'"),
    ({"data": [{"behavior": "b", "default_target": "S", "messages": [{"role": "user", "content": "c"}], "context": 1}]},
     r"data\[0\]: field 'context' should be a string"),
])
def test_harmbench_bad_input(tmp_path, content, match):
    path = tmp_path / "hb.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        data.load_harmbench(path)


# ----------------------------------------------------------------------------------------------------
# Training examples

def build(tok, d, **kwargs):
    logs = []
    sets = data.build_training_sets(tok, d, log=logs.append, **kwargs)
    assert len(logs) == 1
    return sets, logs[0]


def test_official_llama3_layout(llama3, tmp_path):
    d = write_data_dir(tmp_path)
    (cb, retain, val), _ = build(llama3, d, with_request="always")
    user = {"role": "user", "content": CB_RECORDS[0]["prompt"]}
    prompt = llama3.apply_chat_template([user], add_generation_prompt=True)
    assert cb[0].tokens == prompt + llama3.encode(CB_RECORDS[0]["output"])   # no <|eot_id|> after the response
    assert cb[0].tokens[:5] == [128000, 128006, 882, 128007, 271] and cb[0].tokens[-1] != 128009
    assert prompt[-5:] == [128009, 128006, 78191, 128007, 271] and cb[0].n_request == len(prompt)
    assert retain[0].tokens == llama3.apply_chat_template(chat(0)["messages"])  # a whole conversation
    assert val[0].tokens == cb[0].tokens


def test_build_defaults_follow_the_recipe(toy, tmp_path):
    d = write_data_dir(tmp_path)
    (cb, retain, val), log = build(toy, d, n_ultrachat=20, xstest_repeat=3, n_refusal=10, refusal_repeat=2)
    assert (len(cb), len(retain), len(val)) == (40, 20 + 2 * 3 + 10 * 2, 5)
    assert log.startswith("data: 40 circuit-breaker examples; 46 retain (20 UltraChat, 6 XSTest, 20 refusals); "
                          "5 validation")
    empty = toy.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True)
    with_empty = [e for e in cb if e.tokens[:e.n_request] == empty]
    assert 0 < len(with_empty) < len(cb)        # Llama-3 template: request or empty user turn, at random
    refusal = toy.encode("sorry, I cannot help with that")
    assert sum(e.tokens[e.n_request:] == refusal for e in retain) == 20
    again, _ = build(toy, d, n_ultrachat=20, xstest_repeat=3, n_refusal=10, refusal_repeat=2)
    assert again[0] == cb and again[1] == retain
    other, _ = build(toy, d, n_ultrachat=20, xstest_repeat=3, n_refusal=10, refusal_repeat=2, seed=1)
    assert other[0] != cb


def test_build_with_request_always_and_no_refusals(toy, tmp_path):
    d = write_data_dir(tmp_path)
    (cb, retain, _), _ = build(toy, d, with_request="always", refusal_retain=False)
    for e, r in zip(cb, CB_RECORDS):
        assert e.tokens[:e.n_request] == toy.apply_chat_template([{"role": "user", "content": r["prompt"]}], True)
    assert len(retain) == 30 + 2 * 50
    ultrachat = retain[:30]
    assert all(e.tokens == toy.apply_chat_template(chat(i)["messages"]) for i, e in enumerate(ultrachat))


def test_llama31_defaults_are_llama3s(llama31, tmp_path):
    # Llama-3.1/3.2 take Llama-3's recipe: refusals in the retain set, requests kept or emptied at random.
    d = write_data_dir(tmp_path)
    (cb, retain, _), log = build(llama31, d, n_ultrachat=20, xstest_repeat=1, n_refusal=10, refusal_repeat=1)
    assert "10 refusals" in log and len(retain) == 20 + 2 + 10
    empty = llama31.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True)
    assert 0 < sum(e.tokens[:e.n_request] == empty for e in cb) < len(cb)
    assert cb[0].tokens[:5] == [128000, 128006, 9125, 128007, 271]    # the template's own system turn first


def test_xstest_holdout_keeps_the_held_out_prompts_out_of_the_retain_set(toy, tmp_path):
    d = write_data_dir(tmp_path)
    rows = [{"id": f"v2-{i}", "prompt": f"How do I kill process {i}?", "completion": f"Use kill {i}.",
             "final_label": "1_full_compliance"} for i in range(40)]
    write_csv(d / data.XSTEST, rows)
    held = {r["prompt"] for r in rows if data.xstest_held_out(r["prompt"], 0.5)}
    assert 5 < len(held) < 35
    assert {r["prompt"] for r in rows if data.xstest_held_out(r["prompt"], 0.25)} < held  # nested shares
    (_, retain, _), log = build(toy, d, with_request="always", refusal_retain=False, xstest_repeat=1,
                                xstest_holdout=0.5)
    def turn(r):
        return toy.apply_chat_template([{"role": "user", "content": r["prompt"]}], True) + toy.encode(r["completion"])
    assert [e.tokens for e in retain[30:]] == [turn(r) for r in rows if r["prompt"] not in held]
    assert not {tuple(turn(r)) for r in rows if r["prompt"] in held} & {tuple(e.tokens) for e in retain}
    assert f"{40 - len(held)} XSTest ({len(held)} rows held out)" in log
    (_, every, _), _ = build(toy, d, with_request="always", refusal_retain=False, xstest_repeat=1)
    assert len(every) == 30 + 40  # 0, the default: the official set
    with pytest.raises(ValueError, match="--xstest-holdout 0.999999: holds out all 40"):
        build(toy, d, xstest_repeat=1, xstest_holdout=0.999999)
    with pytest.raises(ValueError, match=r"--xstest-holdout 1: expected a share in \[0, 1\)"):
        build(toy, d, xstest_repeat=1, xstest_holdout=1)


def test_mistral_defaults(mistral, tmp_path):
    d = write_data_dir(tmp_path)
    records = [{"prompt": r["prompt"], "output": r["output"]} for r in CB_RECORDS]    # no llama3_output needed
    (d / data.CB_TRAIN).write_text(json.dumps(records))
    (cb, retain, _), log = build(mistral, d, xstest_repeat=1)
    assert "0 refusals" in log and len(retain) == 30 + 2
    first = cb[0].tokens
    request, output = records[0]["prompt"], records[0]["output"]
    assert first == [1] + mistral.encode(f"[INST] {request} [/INST]") + mistral.encode(output)
    assert all(e.n_request > 10 for e in cb)     # always with the request


def test_loss_mask(toy, tmp_path):
    d = write_data_dir(tmp_path)
    (full, retain, _), _ = build(toy, d, loss_on="full")
    (response, _, _), _ = build(toy, d, loss_on="response")
    for f, r in zip(full, response):
        assert f.tokens == r.tokens and f.loss_mask == [1] * len(f.tokens)
        assert r.loss_mask == [0] * r.n_request + [1] * (len(r.tokens) - r.n_request)
    assert all(e.loss_mask == [1] * len(e.tokens) for e in retain)


def test_caps_count_and_report_truncation(toy, tmp_path):
    d = write_data_dir(tmp_path)
    caps = Lengths(request=12, response=6, retain=20)
    (cb, retain, val), log = build(toy, d, caps=caps)
    assert all(e.n_request <= 12 and len(e.tokens) - e.n_request <= 6 for e in cb)
    assert all(len(e.tokens) <= 20 for e in retain + val)
    numbers = [int(n) for n in re.findall(r"(\d+) (?:requests|responses|retain|validation) >", log)]
    assert len(numbers) == 4 and all(n > 0 for n in numbers[1:])
    (_, _, _), untouched = build(toy, d)
    assert "Cut to length: 0 requests > 512, 0 responses > 512, 0 retain > 1024, 0 validation > 1024" in untouched


def test_build_bad_arguments_and_files(toy, tmp_path):
    d = write_data_dir(tmp_path)
    with pytest.raises(ValueError, match="with_request 'sometimes'"):
        data.build_training_sets(toy, d, with_request="sometimes")
    with pytest.raises(ValueError, match="loss_on 'all'"):
        data.build_training_sets(toy, d, loss_on="all")
    (d / data.XSTEST).unlink()
    with pytest.raises(FileNotFoundError, match=data.XSTEST):
        data.build_training_sets(toy, d, log=lambda _: None)
    data.build_training_sets(toy, d, xstest_repeat=0, log=lambda _: None)   # a part left out is not read
    (d / data.CB_TRAIN).write_text(json.dumps([{"prompt": "a", "output": "b"}]))
    with pytest.raises(ValueError, match="record 0: field 'llama3_output' is missing"):
        data.build_training_sets(toy, d, xstest_repeat=0)


# ----------------------------------------------------------------------------------------------------
# Batches

def example(n_request, n_response, loss_on="full"):
    tokens = list(range(10, 10 + n_request + n_response))
    return Example(tokens, n_request, [int(loss_on == "full")] * n_request + [1] * n_response)


def test_batches_pad_only_to_the_longest_row():
    cb = [example(3, k) for k in range(1, 9)]
    retain = [example(2, 2 * k) for k in range(1, 9)]
    stream = data.batches(cb, retain, 4, pad_id=0, seed=0)
    seen = []
    for _ in range(2):
        b = next(stream)
        lengths = b.cb_mask.sum(1)
        assert b.cb_tokens.shape == (4, int(lengths.max()))
        assert b.retain_tokens.shape[1] == int(b.retain_mask.sum(1).max())
        for row in range(4):
            n = int(lengths[row])
            assert b.cb_mask[row].tolist() == [1] * n + [0] * (b.cb_tokens.shape[1] - n)   # right padding
            assert (b.cb_tokens[row, n:] == 0).all()
            seen.append(b.cb_tokens[row, :n].tolist())
        assert (b.cb_loss_mask == b.cb_mask).all() and b.cb_tokens.dtype == b.cb_mask.dtype == torch.long
    assert sorted(seen) == sorted(e.tokens for e in cb)     # one epoch sees every example once
    third = next(stream)                                     # then a new epoch starts
    assert third.cb_tokens.shape[0] == 4


def test_batches_response_loss_mask_and_determinism():
    cb = [example(3, 2, "response") for _ in range(4)]
    b = next(data.batches(cb, cb, 4, pad_id=7))
    assert b.cb_loss_mask[0].tolist() == [0, 0, 0, 1, 1]
    one = [next(data.batches([example(1, k) for k in range(1, 20)], cb * 5, 4, pad_id=0, seed=3)) for _ in range(2)]
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(*one))


def test_bucketing_reduces_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (256,), generator=gen).tolist()
    cb = [example(1, n) for n in lengths]

    def padding(bucket):
        stream = data.batches(cb, cb, 8, pad_id=0, bucket=bucket)
        return sum(int((1 - b.cb_mask).sum()) for b, _ in zip(stream, range(32)))

    assert padding(bucket=16) < padding(bucket=0) / 4
    longest = [b.cb_tokens.shape[1] for b, _ in zip(data.batches(cb, cb, 8, pad_id=0, bucket=16), range(16))]
    assert longest != sorted(longest)       # the batches of a window come in random order, not short to long


def test_packed_batches_hold_the_same_rows_one_after_another():
    cb = [example(3, k, "response") for k in range(1, 9)]
    retain = [example(2, 2 * k) for k in range(1, 9)]
    padded = data.batches(cb, retain, 4, pad_id=0, seed=5)
    packed = data.batches(cb, retain, 4, pad_id=0, seed=5, pack=True)
    for _ in range(3):  # into a second epoch: the same random draws either way
        a, b = next(padded), next(packed)
        for tokens, mask, loss_mask, lengths in ((a.cb_tokens, a.cb_mask, a.cb_loss_mask, b.cb_lengths),
                                                 (a.retain_tokens, a.retain_mask, a.retain_mask, b.retain_lengths)):
            assert list(lengths) == mask.sum(1).tolist()
        for name in ("cb_tokens", "cb_mask", "cb_loss_mask", "retain_tokens", "retain_mask"):
            rows, flat = getattr(a, name), getattr(b, name)
            mask = a.cb_mask if name.startswith("cb") else a.retain_mask
            real = rows[mask.bool()]  # the rows' real tokens, in order
            assert flat.shape == (1, -(-len(real) // data.PACK_MULTIPLE) * data.PACK_MULTIPLE)
            assert flat[0, :len(real)].tolist() == real.tolist()
            assert not flat[0, len(real):].any()  # the tail: pad id 0, mask 0
        assert b.size == a.size == 4


def test_split_cuts_rows_in_order_in_both_layouts():
    cb = [example(3, k) for k in range(1, 9)]
    for pack in (False, True):
        batch = next(data.batches(cb, cb, 5, pad_id=0, pack=pack))
        pieces = batch.split(2)
        assert [p.size for p in pieces] == [2, 2, 1]
        for name in ("cb_tokens", "cb_mask", "retain_tokens", "retain_mask", "cb_loss_mask"):
            joined = torch.cat([getattr(p, name) for p in pieces], dim=1 if pack else 0)
            assert torch.equal(joined, getattr(batch, name))
        if pack:
            assert sum((p.cb_lengths for p in pieces), ()) == batch.cb_lengths
            assert [p.cb_tokens.shape[1] for p in pieces[:2]] == [sum(p.cb_lengths) for p in pieces[:2]]


def test_pack_and_official_padding_exclude_each_other():
    with pytest.raises(ValueError, match="pack and pad_to exclude each other"):
        next(data.batches([example(1, 1)] * 2, [example(1, 1)] * 2, 2, pad_id=0, pack=True, pad_to=OFFICIAL_LENGTHS))


def test_official_padding_layout():
    cb = [example(3, 2), example(5, 4)]
    retain = [example(2, 3), example(4, 4)]
    b = next(data.batches(cb, retain, 2, pad_id=0, pad_to=OFFICIAL_LENGTHS))
    assert b.cb_tokens.shape == (2, 1024) and b.retain_tokens.shape == (2, 1024)
    for row in range(2):
        n_request = int(b.cb_mask[row, :512].sum())
        assert b.cb_mask[row, 512 - n_request:512].all() and not b.cb_mask[row, :512 - n_request].any()  # left
        n_response = int(b.cb_mask[row, 512:].sum())
        assert b.cb_mask[row, 512:512 + n_response].all() and not b.cb_mask[row, 512 + n_response:].any()  # right
        n = int(b.retain_mask[row].sum())
        assert b.retain_mask[row, 1024 - n:].all() and not b.retain_mask[row, :1024 - n].any()  # left
    with pytest.raises(ValueError, match="longer than its fixed padding"):
        next(data.batches([example(600, 1)] * 2, retain, 2, pad_id=0, pad_to=OFFICIAL_LENGTHS))


def test_batches_need_enough_examples():
    with pytest.raises(ValueError, match="batch size 4 is more than the 3 examples"):
        next(data.batches([example(1, 1)] * 3, [example(1, 1)] * 10, 4, pad_id=0))
    # batches() is a generator: the same check, callable before anything is written
    with pytest.raises(ValueError, match=r"--batch-size 4 is more than the 3 examples each set can give \(3 circ"):
        data.check_batch_size([example(1, 1)] * 3, [example(1, 1)] * 10, 4, name="--batch-size")


def test_collate_for_validation():
    tokens, mask, loss_mask = data.collate([example(2, 1), example(1, 1)], pad_id=9)
    assert tokens.tolist() == [[10, 11, 12], [10, 11, 9]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad():
    rows = [[1, 2, 3], [4]]
    assert data.pad(rows, 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert data.pad(rows, 9, "left").tolist() == [[1, 2, 3], [9, 9, 4]]
    fixed = data.pad(rows, -100, length=5)
    assert fixed.dtype == torch.long and fixed.tolist() == [[1, 2, 3, -100, -100], [4, -100, -100, -100, -100]]
    with pytest.raises(ValueError, match=r"row 0 of the batch is longer than its fixed padding allows \(3 > 2, "):
        data.pad(rows, 0, length=2)
    with pytest.raises(ValueError, match="side 'top'"):
        data.pad(rows, 0, "top")
