"""The circuit-breaker training data: the official files, the official formatting, and batches.

Reading order:
  1. Loaders for the files researchers already have, with one clear error per bad record.
  2. Training examples: the official recipe of the circuit-breaker paper (Zou et al. 2024).
  3. Batches: a circuit-breaker row and a retain row per example, packed one after another into one
     sequence per set (or padded to the longest row).

The tokenizers and their exact chat templates are in tokenizer.py.

The official recipe (GraySwanAI/circuit-breakers, src/cb_train_dataset.py), which section 2 follows:

  - Every example is one turn, "{user_tag}{request}{assistant_tag}<SEPARATOR>{response}", tokenized with BOS
    and without an end-of-turn token after the response. For Llama-3 each example picks at random between
    the request and an empty user turn (the "no user request" case, `switch_select = [0, 1]`); for Mistral
    it always keeps the request (`switch_select = [0]`).
  - Circuit-breaker set: every record of circuit_breakers_train.json, `prompt` + `output`.
  - Retain set: the first 10,000 or so UltraChat (test_sft) conversations with at least two messages (the whole
    conversation in the chat template, or messages[1] after an empty user turn); XSTest rows labelled
    `1_full_compliance`, repeated 50 times; and, for Llama-3 only, 2,000 circuit-breaker records drawn at
    random, twice each, with Llama-3's own refusal `llama3_output` as the response.
  - Validation: circuit_breakers_val.json, `prompt` + `output`, always with the request.
  - Lengths: circuit-breaker request at most 512 tokens (left-padded to 512), response at most 512
    (right-padded to 512); retain at most 1024 (left-padded to 1024). Truncation keeps the start.
  - The rerouting loss looks at every real token of the circuit-breaker row (its attention mask).

Where we leave it, and why:
  - We pack a batch's rows one after another into one sequence per set, each row still run as if alone
    (model.py, "Packed rows"), so no row is padded; `pack=False` pads to the longest row of a batch
    instead, and the official 512 + 512 and 1024 layout remains available as `pad_to=OFFICIAL_LENGTHS`,
    for timing. Batches are drawn at random as officially: sorting rows by length into batches
    (`bucket`) would pad less but reweight examples, since the rerouting term is a token mean per batch.
    The masks keep padding out of the losses (the official retain loss also counted padded positions in its
    mean, which a loss can reproduce from the mask). The official left padding shifted the positions of a
    row's tokens by a constant, which RoPE attention ignores.
  - The random choice is drawn from our own seeded generator; officially numpy's global generator, seeded
    with np.random.seed(42) before the dataset is built, so both are reproducible but draw differently.
  - The request goes through the chat template, which trims it (as Llama-3's template and Meta's own code
    do); the official one-shot string did not. Requests rarely carry surrounding whitespace.
  - Request and response are tokenized separately for retain too (officially only for the circuit-breaker
    set). Only a response that starts with a line break can tokenize differently.
  - Officially the dataset length is min(len(retain), len(circuit breaker)) and retain examples beyond it
    are never seen. We draw that many examples afresh from each set every epoch. The paper's 150 steps of
    16 examples are less than one epoch either way.
"""

import codecs
import csv
import functools
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from tokenizer import LLAMA3_FORMATS, Tokenizer, check_messages

# ----------------------------------------------------------------------------------------------------
# 1. Loaders. Each returns a plain list of dicts, or raises one error naming the file, the record (index
# in a JSON list, line in JSONL or CSV) and the field.

def load_circuit_breaker_set(path, fields=("prompt", "output")) -> list[dict]:
    """circuit_breakers_{train,val}.json: [{"prompt", "output", "llama3_output", "category"}, ...].
    `fields` are the ones required (as strings): add "llama3_output" for the refusal retain set."""
    return _json_records(path, fields)


def load_instructions(path) -> list[dict]:
    """An instruction list such as harmful_train.json: [{"instruction", "category"?}, ...]."""
    return _json_records(path, ("instruction",))


def load_ultrachat(path, limit: int | None = None, min_messages: int = 2,
                   check: Callable[[list, str], None] = check_messages) -> list[dict]:
    """UltraChat as JSONL, one {"messages": [{"role", "content"}, ...]} per line (ultrachat_200k `to_json`).

    Returns the first `limit` conversations with at least `min_messages` messages, in file order (the
    official code takes the first 10,000 test_sft conversations with a reply). Only those lines are read.
    `check(messages, where)` checks each conversation: pass a tokenizer's `check_chat` to have its chat
    template's turn order checked here, where the message can name the line.
    """
    path = _existing(path)
    conversations = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(conversations) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
            except UnicodeDecodeError:
                raise ValueError(f"{path}: line {n}: not UTF-8 text") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f"{path}: line {n}: field 'messages' is missing")
            check(record["messages"], f"{path}: line {n}: messages")
            if len(record["messages"]) >= min_messages:
                conversations.append(record)
    if not conversations:
        raise ValueError(f"{path}: no conversation with at least {min_messages} messages")
    return conversations


def load_xstest(path, label: str = "1_full_compliance") -> list[dict]:
    """XSTest completions CSV (xstest_v2_completions_gpt4_gpteval.csv): the rows whose `final_label` is `label`,
    each a dict of all columns, with at least `prompt` and `completion`."""
    path = Path(path)
    columns = ("prompt", "completion", "final_label")
    rows = []
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: line 1: missing column(s) {', '.join(missing)} "
                                 f"(found {', '.join(reader.fieldnames or []) or 'none'})")
            for row in reader:
                short = [c for c in columns if row[c] is None]
                if short:
                    raise ValueError(f"{path}: line {reader.line_num}: field '{short[0]}' is missing (row too short)")
                if row["final_label"] == label:
                    rows.append(row)
        except csv.Error as e:
            raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no row has final_label {label!r}")
    return rows


def xstest_held_out(prompt: str, fraction: float) -> bool:
    """Whether an XSTest prompt is kept out of training, so over-refusal can be measured on prompts the
    retain set never saw (XSTest's compliant answers are in the official retain set). A function of the
    prompt's text alone (its SHA-256 read as a number in [0, 1) below `fraction`): train.py's
    --xstest-holdout and eval.py xstest's pick the same prompts, from either XSTest CSV, in any row order,
    and a larger fraction holds out a superset."""
    digest = hashlib.sha256(prompt.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def load_harmbench(path) -> list[dict]:
    """HarmBench behaviours: {"name", "description", "data": [{"behavior", "default_target", "messages",
    "context"?}]}. Returns the `data` records; `context` is None where a behaviour has none."""
    path = Path(path)
    content = _read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list")
    records = []
    for i, record in enumerate(content["data"]):
        where = f"{path}: data[{i}]"
        _check_fields(where, record, ("behavior", "default_target"))
        if "messages" not in record:
            raise ValueError(f"{where}: field 'messages' is missing")
        check_messages(record["messages"], f"{where}: messages")
        context = record.get("context")
        if context is not None and not isinstance(context, str):
            raise ValueError(f"{where}: field 'context' should be a string, got {type(context).__name__}")
        records.append({**record, "context": context})
    if not records:
        raise ValueError(f"{path}: 'data' is empty")
    return records


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_text(path: Path) -> str:
    """A whole file as text. A byte that is not UTF-8 is reported with its line: decoding the whole
    file at once gives its offset in the file, where a text stream would only say which chunk."""
    raw = _existing(path).read_bytes().removeprefix(codecs.BOM_UTF8)  # spreadsheets often write a BOM
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (line {line}: byte {raw[e.start]:#04x}, {e.reason})") from None


def _read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except RecursionError:  # json's parser recurses once per bracket: thousands of nested lists exhaust the stack
        raise ValueError(f"{path}: nested too deeply to read as JSON") from None


def _json_records(path, fields) -> list[dict]:
    path = Path(path)
    records = _read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for i, record in enumerate(records):
        _check_fields(f"{path}: record {i}", record, fields)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _check_fields(where: str, record, fields) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for field in fields:
        if field not in record:
            raise ValueError(f"{where}: field '{field}' is missing")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field '{field}' should be a string, got {type(record[field]).__name__}")


# ----------------------------------------------------------------------------------------------------
# 2. Training examples

# File names inside --data-dir, as in the official data/ folder (UltraChat exported to JSONL).
CB_TRAIN = "circuit_breakers_train.json"
CB_VAL = "circuit_breakers_val.json"
ULTRACHAT = "ultrachat.jsonl"
XSTEST = "xstest_v2_completions_gpt4_gpteval.csv"


class Lengths(NamedTuple):
    """Token caps, and the fixed padding of `pad_to`: the official 512 + 512 and 1024."""
    request: int = 512     # circuit-breaker request: BOS + template up to the assistant header
    response: int = 512    # circuit-breaker response
    retain: int = 1024     # a whole retain (or validation) example


OFFICIAL_LENGTHS = Lengths()


class Example(NamedTuple):
    tokens: list[int]      # BOS, the request in the chat template, then the response; capped
    n_request: int         # how many leading tokens are the request part (the official layout left-pads it)
    loss_mask: list[int]   # 1 where the rerouting loss looks: every token ("full") or the response only


def build_training_sets(tokenizer: Tokenizer, data_dir, *, refusal_retain: bool | None = None,
                        with_request: str | None = None, loss_on: str = "full", seed: int = 0,
                        n_ultrachat: int = 10_000, xstest_repeat: int = 50, xstest_holdout: float = 0.0,
                        n_refusal: int = 2_000, refusal_repeat: int = 2, caps: Lengths = OFFICIAL_LENGTHS,
                        log: Callable[[str], None] = print) -> tuple[list[Example], list[Example], list[Example]]:
    """(circuit-breaker, retain, validation) examples from the official files in `data_dir`.

    refusal_retain: add Llama-3's refusals (`llama3_output`) to the retain set; None = official (Llama-3 only;
        Llama-3.1/3.2 count as Llama-3 here and below).
    with_request: "random" (each example keeps its request or gets an empty user turn, even odds) or
        "always"; None = official ("random" for the Llama-3 template, "always" otherwise).
    loss_on: "full" (official: the rerouting loss sees the whole circuit-breaker text) or "response".
    n_ultrachat, xstest_repeat, n_refusal, refusal_repeat: the official retain mix (10,000 conversations;
        XSTest x50; 2,000 refusals x2); 0 leaves a part out without reading its file.
    xstest_holdout: the share of XSTest prompts kept out of the retain set (xstest_held_out), for an
        over-refusal measure on prompts training never saw; 0 = official (every compliant row).
    caps: length caps; longer examples keep their start, are counted, and reported once through `log`.
    Every file is read and checked before any tokenizing.
    """
    if refusal_retain is None:
        refusal_retain = tokenizer.chat_format in LLAMA3_FORMATS
    if with_request is None:
        with_request = "random" if tokenizer.chat_format in LLAMA3_FORMATS else "always"
    if with_request not in ("random", "always"):
        raise ValueError(f"with_request {with_request!r}: expected 'random' or 'always'")
    if loss_on not in ("full", "response"):
        raise ValueError(f"loss_on {loss_on!r}: expected 'full' or 'response'")

    data_dir = Path(data_dir)
    cb_fields = ("prompt", "output") + (("llama3_output",) if refusal_retain and n_refusal else ())
    cb_records = load_circuit_breaker_set(data_dir / CB_TRAIN, cb_fields)
    val_records = load_circuit_breaker_set(data_dir / CB_VAL)
    chats = load_ultrachat(data_dir / ULTRACHAT, limit=n_ultrachat, check=tokenizer.check_chat) if n_ultrachat else []
    if not 0 <= xstest_holdout < 1:
        raise ValueError(f"--xstest-holdout {xstest_holdout}: expected a share in [0, 1)")
    xstest = load_xstest(data_dir / XSTEST) if xstest_repeat else []
    held_out = [r for r in xstest if xstest_held_out(r["prompt"], xstest_holdout)]
    xstest = [r for r in xstest if not xstest_held_out(r["prompt"], xstest_holdout)]
    if held_out and not xstest:
        raise ValueError(f"--xstest-holdout {xstest_holdout}: holds out all {len(held_out)} compliant XSTest "
                         "rows; use a smaller share, or --xstest-repeat 0")

    rng = random.Random(seed)
    refusals = rng.sample(cb_records, min(n_refusal, len(cb_records))) if refusal_retain else []
    cut = {"request": 0, "response": 0, "retain": 0, "val": 0}

    def keep_request() -> bool:
        return with_request == "always" or rng.random() < 0.5

    @functools.lru_cache(maxsize=None)   # XSTest rows and refusals repeat
    def turn(request: str, response: str) -> tuple[list[int], list[int]]:
        # The official one-shot turn: BOS + user header + request + <|eot_id|> + assistant header | response.
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)
        return prompt, tokenizer.encode(response)

    def cb_example(request: str, response: str) -> Example:
        prompt, reply = turn(request if keep_request() else "", response)
        cut["request"] += len(prompt) > caps.request
        cut["response"] += len(reply) > caps.response
        prompt, reply = prompt[:caps.request], reply[:caps.response]
        return Example(prompt + reply, len(prompt), [int(loss_on == "full")] * len(prompt) + [1] * len(reply))

    def whole_example(prompt: list[int], reply: list[int], kind: str = "retain") -> Example:
        tokens = prompt + reply
        cut[kind] += len(tokens) > caps.retain
        tokens = tokens[:caps.retain]
        return Example(tokens, min(len(prompt), len(tokens)), [1] * len(tokens))

    def retain_example(request: str, response: str) -> Example:
        return whole_example(*turn(request if keep_request() else "", response))

    def ultrachat_example(messages: list[dict]) -> Example:
        # Officially: the whole conversation in the chat template, or its first reply after an empty turn.
        if keep_request():
            return whole_example(tokenizer.apply_chat_template(messages), [])
        return whole_example(*turn("", messages[1]["content"]))

    cb = [cb_example(r["prompt"], r["output"]) for r in cb_records]
    retain = [ultrachat_example(c["messages"]) for c in chats]
    retain += [retain_example(r["prompt"], r["completion"]) for r in xstest * xstest_repeat]
    retain += [retain_example(r["prompt"], r["llama3_output"]) for r in refusals * refusal_repeat]
    val = [whole_example(*turn(r["prompt"], r["output"]), kind="val") for r in val_records]

    log(f"data: {len(cb)} circuit-breaker examples; {len(retain)} retain ({len(chats)} UltraChat, "
        f"{len(xstest) * xstest_repeat} XSTest" + (f" ({len(held_out)} rows held out)" if xstest_holdout else "")
        + f", {len(refusals) * refusal_repeat} refusals); {len(val)} validation. "
        f"Cut to length: {cut['request']} requests > {caps.request}, {cut['response']} responses > {caps.response}, "
        f"{cut['retain']} retain > {caps.retain}, {cut['val']} validation > {caps.retain} tokens")
    return cb, retain, val


# ----------------------------------------------------------------------------------------------------
# 3. Batches

# A packed batch's tensors are (1, N): the rows one after another, then padding up to a multiple of
# PACK_MULTIPLE tokens, so that a compiled model (--compile) sees a few sequence lengths rather than a new one
# per step.
PACK_MULTIPLE = 64


class Batch(NamedTuple):
    cb_tokens: torch.Tensor      # (B, Tc) long; packed: (1, Nc)
    cb_mask: torch.Tensor        # (B, Tc) long, 1 = real token
    retain_tokens: torch.Tensor  # (B, Tr) long; packed: (1, Nr)
    retain_mask: torch.Tensor    # (B, Tr) long
    cb_loss_mask: torch.Tensor   # (B, Tc) long, 1 = the rerouting loss looks here
    cb_lengths: tuple[int, ...] | None = None      # packed: each row's length, in order; None: one row each
    retain_lengths: tuple[int, ...] | None = None

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in self))

    @property
    def size(self) -> int:
        """Examples of each set."""
        return self.cb_tokens.shape[0] if self.cb_lengths is None else len(self.cb_lengths)

    def split(self, size: int) -> list["Batch"]:
        """Pieces of `size` examples of each set (the last may hold fewer), in order: micro-batches."""
        cb, retain = self[0:2] + self[4:5], self[2:4]
        cb_pieces, cb_lengths = _split(cb, self.cb_lengths, size)
        retain_pieces, retain_lengths = _split(retain, self.retain_lengths, size)
        return [Batch(c[0], c[1], r[0], r[1], c[2], cl, rl)
                for c, r, cl, rl in zip(cb_pieces, retain_pieces, cb_lengths, retain_lengths, strict=True)]


def _split(tensors, lengths, size):
    """One set's (B, T) tensors cut into pieces of `size` rows, or, packed, (1, N) ones cut where rows
    begin (the padding tail stays with the last piece). -> (pieces, their lengths or Nones)."""
    if lengths is None:
        B = tensors[0].shape[0]
        return [[t[i:i + size] for t in tensors] for i in range(0, B, size)], [None] * -(-B // size)
    starts = [sum(lengths[:i]) for i in range(0, len(lengths), size)]
    ends = starts[1:] + [tensors[0].shape[1]]
    return ([[t[:, a:b] for t in tensors] for a, b in zip(starts, ends)],
            [lengths[i:i + size] for i in range(0, len(lengths), size)])


def batches(cb: list[Example], retain: list[Example], batch_size: int, *, pad_id: int, seed: int = 0,
            pack: bool = False, bucket: int = 0, pad_to: Lengths | None = None) -> Iterator[Batch]:
    """Endless batches pairing circuit-breaker and retain examples; take as many as there are steps.

    Each epoch draws n = min(len(cb), len(retain)) examples from each set in a fresh random order and
    drops the last partial batch. pack: each set's rows one after another in one sequence (pack_rows).
    Otherwise rows are right-padded to the longest row of their batch; pad_to=OFFICIAL_LENGTHS instead
    pads as the official code did: request left-padded to 512 and response right-padded to 512; retain
    left-padded to 1024. bucket > 0 sorts rows by length within windows of `bucket` batches (then
    shuffles those batches), so rows of a batch have similar lengths and less padding.
    """
    check_batch_size(cb, retain, batch_size)
    if pack and pad_to is not None:
        raise ValueError("batches: pack and pad_to exclude each other (packed rows have no padding to lay out)")
    n = min(len(cb), len(retain))
    rng = random.Random(seed)
    while True:
        cb_rows, retain_rows = rng.sample(cb, n), rng.sample(retain, n)
        for cb_batch, retain_batch in zip(_group(cb_rows, batch_size, bucket, rng),
                                          _group(retain_rows, batch_size, bucket, rng)):
            if pack:
                (cb_tokens, cb_mask, cb_loss_mask), cb_lengths = pack_rows(cb_batch, pad_id)
                (retain_tokens, retain_mask, _), retain_lengths = pack_rows(retain_batch, pad_id)
                yield Batch(cb_tokens, cb_mask, retain_tokens, retain_mask, cb_loss_mask, cb_lengths, retain_lengths)
                continue
            if pad_to is None:
                cb_tokens, cb_mask, cb_loss_mask = collate(cb_batch, pad_id)
                retain_tokens, retain_mask, _ = collate(retain_batch, pad_id)
            else:
                cb_tokens, cb_mask, cb_loss_mask = _official_cb_layout(cb_batch, pad_id, pad_to)
                retain_tokens, retain_mask, _ = collate(retain_batch, pad_id, "left", pad_to.retain)
            yield Batch(cb_tokens, cb_mask, retain_tokens, retain_mask, cb_loss_mask)


def check_batch_size(cb: list[Example], retain: list[Example], batch_size: int, name: str = "batch size"):
    """batches() draws batch_size examples of each set per batch. It is a generator, so it would refuse
    only when the first batch is asked for: callers that must refuse before writing anything call this.
    `name` names the setting in the message (train.py: the flag)."""
    n = min(len(cb), len(retain))
    if n < batch_size:
        raise ValueError(f"{name} {batch_size} is more than the {n} examples each set can give "
                         f"({len(cb)} circuit-breaker, {len(retain)} retain)")


def _group(rows: list[Example], batch_size: int, bucket: int, rng: random.Random) -> list[list[Example]]:
    rows = rows[:len(rows) - len(rows) % batch_size]
    if not bucket:
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    groups = []
    window = bucket * batch_size
    for start in range(0, len(rows), window):
        by_length = sorted(rows[start:start + window], key=lambda e: len(e.tokens))
        in_window = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
        rng.shuffle(in_window)
        groups += in_window
    return groups


def collate(examples: list[Example], pad_id: int, side: str = "right",
            length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, mask, loss_mask), each (B, T) long, padded on `side` to the longest row or to `length`."""
    return (pad([e.tokens for e in examples], pad_id, side, length),
            pad([[1] * len(e.tokens) for e in examples], 0, side, length),
            pad([e.loss_mask for e in examples], 0, side, length))


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts to generate from -> tokens and attention mask, each (B, T): left padding keeps every prompt's
    last token at the same position, where the next token is read; model.py counts positions over real
    tokens, so the padding changes nothing."""
    return pad(prompts, pad_id, "left"), pad([[1] * len(p) for p in prompts], 0, "left")


def pack_rows(examples: list[Example], pad_id: int, multiple: int = PACK_MULTIPLE):
    """((tokens, mask, loss_mask), lengths): the rows one after another, each tensor (1, N) long with N the
    total length rounded up to a multiple of `multiple` (the tail is padding, mask 0), and each row's length."""
    lengths = tuple(len(e.tokens) for e in examples)
    N = -(-sum(lengths) // multiple) * multiple
    flat = lambda rows: [[x for row in rows for x in row]]  # noqa: E731
    return ((pad(flat(e.tokens for e in examples), pad_id, length=N),
             pad([[1] * sum(lengths)], 0, length=N),
             pad(flat(e.loss_mask for e in examples), 0, length=N)), lengths)


def _official_cb_layout(examples: list[Example], pad_id: int,
                        pad_to: Lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """collate's three tensors for circuit-breaker rows laid out as the official code did: the request
    left-padded to pad_to.request tokens, then the response right-padded to pad_to.response."""
    requests = [Example(e.tokens[:e.n_request], e.n_request, e.loss_mask[:e.n_request]) for e in examples]
    responses = [Example(e.tokens[e.n_request:], 0, e.loss_mask[e.n_request:]) for e in examples]
    halves = zip(collate(requests, pad_id, "left", pad_to.request),
                 collate(responses, pad_id, "right", pad_to.response))
    return tuple(torch.cat(pair, dim=1) for pair in halves)  # each (B, pad_to.request + pad_to.response)


def pad(rows: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """Rows of ints as one (B, T) long tensor, each filled with `value` on its `side` ("right" or "left")
    up to T: the longest row's length, or `length` when given (a longer row is then an error)."""
    if side not in ("right", "left"):
        raise ValueError(f"side {side!r}: expected 'right' or 'left'")
    T = max(len(row) for row in rows) if length is None else length
    padded = []
    for i, row in enumerate(rows):
        if len(row) > T:
            raise ValueError(f"row {i} of the batch is longer than its fixed padding allows "
                             f"({len(row)} > {T}, padded on the {side})")
        fill = [value] * (T - len(row))
        padded.append(row + fill if side == "right" else fill + row)
    return torch.tensor(padded, dtype=torch.long)  # (B, T)


def evenly_spaced(items: list, n: int) -> list:
    """n of the items (all, if fewer), evenly spaced from the first: HarmBench's behaviours come grouped by
    category, so the first n would cover a few categories only."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)] if n else []
