"""Tokenizers and exact chat templates: Llama-3, 3.1 and 3.2 (tiktoken), Mistral and Llama-2
(sentencepiece), and SmolLM2's ChatML (a Hugging Face tokenizer.json).

Reading order:
  1. Tokenizer: Llama-3's tiktoken file or a sentencepiece model, loaded from `tokenizer.model`; else a
     `tokenizer.json`, read by the `tokenizers` library, whose chat template tokenizer_config.json names.
  2. Chat templates: Llama-3 (and 3.1/3.2, which open with a dated system turn), Mistral (v0.1/v0.2),
     Llama-2-chat and ChatML, token for token as the models saw them.
  3. Messages: the checks every template makes, the turn order Mistral and Llama-2 need, and where their
     system prompt goes (they have no system turn).
  4. The template's tail: the tokens between the end of the user's text and the model's answer.
  5. Reading the files: tiktoken's BPE ranks, Meta's cut of long runs, sentencepiece's control pieces,
     config.json for which sentencepiece template, and tokenizer_config.json's chat template (which of
     Llama-3, 3.1 or 3.2 a tiktoken file is).
"""

import base64
import binascii
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sentencepiece
import tiktoken
import tokenizers

# ----------------------------------------------------------------------------------------------------
# 1. Tokenizer

# Meta's split pattern for Llama-3 (llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The 256 special tokens that follow the 128,000 BPE ranks, in id order (Llama-3 names).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
# The tokens the Llama-3 template inserts. A sentencepiece model holding all of them (the toy world's
# tokenizer) uses the Llama-3 template too.
LLAMA3_CONTROL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama-3.1 renamed some reserved tokens (llama-models); the others keep Llama-3's names here.
LLAMA31_RENAMED = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}
# One tokenizer, three templates: 3.1 and 3.2 open every conversation with a dated system turn.
LLAMA3_FORMATS = ("llama3", "llama3.1", "llama3.2")
CHAT_FORMATS = (*LLAMA3_FORMATS, "mistral", "llama2", "chatml")

# Meta's Llama-3.x Instruct chat_templates (tokenizer_config.json on the Hugging Face hub), known by the
# sha256 of their exact text; the texts are tests/fixtures/llama3*_chat_template.jinja. Any other template
# beside a tiktoken file is refused, not guessed.
LLAMA3_TEMPLATES = {
    # meta-llama/Meta-Llama-3-8B-Instruct (and 70B): the short template, no system turn of its own.
    "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122": "llama3",
    # meta-llama/Llama-3.1-8B-Instruct (the same text in Llama-3.3-70B-Instruct), as in ggerganov/llama.cpp
    # models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja: "Today Date: 26 Jul 2024" unless date_string.
    "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65": "llama3.1",
    # meta-llama/Llama-3.2-1B-Instruct and -3B-Instruct, as in ggerganov/llama.cpp
    # models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja: today's date, strftime_now("%d %b %Y").
    "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4": "llama3.2",
}
# The system turn the Llama-3.1/3.2 templates write first (without tools), before any system message.
LLAMA31_SYSTEM = "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
LLAMA31_DATE = "26 Jul 2024"   # Llama-3.1's date (and 3.2's when the renderer has no strftime_now)

# SmolLM2-Instruct's chat_template (tokenizer_config.json), verbatim: ChatML with a default system turn.
# A tokenizer.json model must carry a template listed here; any other is refused, not guessed.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# template text -> (chat format, the system message it inserts when the conversation has none)
KNOWN_TEMPLATES = {
    SMOLLM2_TEMPLATE: ("chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
}
# The tokens ChatML inserts or stops on.
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

# Meta's encoder feeds tiktoken at most 400,000 characters at a time and cuts runs of more than 25,000
# spaces or non-spaces (tiktoken is very slow on them); we cut the same way so ids match Meta's.
_MAX_CHUNK = 400_000
_MAX_RUN = 25_000
_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN + 1}}}|\S{{{_MAX_RUN + 1}}}")


class Tokenizer:
    """Text <-> token ids for Llama-3 (tiktoken), Mistral and Llama-2 (sentencepiece), ChatML models
    (tokenizer.json), plus chat templates.

    `encode` never produces a special token: text that spells `<|eot_id|>`, `</s>` or `<|im_end|>` stays
    plain text, as in Meta's encoder (HF's would parse it), so a message cannot forge a turn. Only the
    template inserts special tokens. `decode` follows each library: tiktoken shows special tokens,
    sentencepiece and tokenizers drop them.

    Llama-3.1/3.2 write "Today Date: {date}" in their system turn: `date_string` ("%d %b %Y", e.g.
    "26 Jul 2024") pins it, as transformers' `apply_chat_template(..., date_string=...)` does. Left None,
    Llama-3.1 writes 26 Jul 2024 and Llama-3.2 today's date, so Llama-3.2 prompts change from day to day
    unless it is pinned.
    """

    def __init__(self, kind: str, chat_format: str, model, special: dict[str, int], default_system: str | None = None,
                 date_string: str | None = None):
        self.kind = kind                  # "tiktoken", "sentencepiece" or "tokenizers"
        self.chat_format = chat_format    # "llama3", "llama3.1", "llama3.2", "mistral", "llama2" or "chatml"
        self.model = model                # tiktoken.Encoding, SentencePieceProcessor or tokenizers.Tokenizer
        self.special = special            # the special tokens the template inserts, by name
        self.default_system = default_system  # the system message a ChatML template adds when there is none
        self.date_string = date_string    # Llama-3.1/3.2's "Today Date"; None = the template's own
        if chat_format in LLAMA3_FORMATS:
            self.bos_id = special["<|begin_of_text|>"]
            self.eos_id = special["<|end_of_text|>"]
            self.stop_ids = [self.eos_id, special["<|eot_id|>"]]
            if "<|eom_id|>" in special:   # Llama-3.1+ ends a turn with it when it calls a tool and awaits the result
                self.stop_ids.append(special["<|eom_id|>"])
        elif chat_format == "chatml":
            # SmolLM2's config names <|im_start|> bos and <|im_end|> eos; the template adds no bos of its own.
            self.bos_id, self.eos_id = special["<|im_start|>"], special["<|im_end|>"]
            self.stop_ids = [self.eos_id, special["<|endoftext|>"]]
        else:
            self.bos_id, self.eos_id = special["<s>"], special["</s>"]
            self.stop_ids = [self.eos_id]
        # Llama-3, Mistral and Llama-2 have no pad token and the official code pads with eos; SmolLM2's pad
        # token is its eos too. Padding is always masked.
        self.pad_id = self.eos_id
        self.vocab_size = {"tiktoken": lambda: model.n_vocab, "sentencepiece": lambda: model.get_piece_size(),
                           "tokenizers": lambda: model.get_vocab_size(with_added_tokens=True)}[kind]()
        self.path: Path | None = None     # the file it was read from (from_pretrained sets it), for messages

    @classmethod
    def from_pretrained(cls, model_dir, chat_format: str | None = None, date_string: str | None = None) -> "Tokenizer":
        """Load `tokenizer.model` (or `original/tokenizer.model`) from a model folder, else its
        `tokenizer.json`; or that file itself.

        The file tells its kind. A tiktoken file is Llama-3's tokenizer: the chat_template of
        `tokenizer_config.json` (or `chat_template.jinja`) beside it says Llama-3, 3.1 or 3.2, and without
        one it is Llama-3's, unless `chat_format` says otherwise. A sentencepiece model is Mistral's or
        Llama-2's: `config.json` beside it says which (MistralForCausalLM -> mistral, else llama2), unless
        `chat_format` does. A tokenizer.json model's template is the chat_template beside it.
        date_string: Llama-3.1/3.2's "Today Date" (see the class docstring).
        """
        model_dir = Path(model_dir)
        path = _find_tokenizer_file(model_dir)
        folder = model_dir if model_dir.is_dir() else path.parent
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r}: expected one of {', '.join(CHAT_FORMATS)}")
        if path.suffix == ".json":
            tokenizer = cls._from_tokenizer_json(path, chat_format)
        elif _is_tiktoken_file(path):
            if chat_format not in (None, *LLAMA3_FORMATS):
                raise ValueError(f"{path}: a tiktoken (Llama-3) tokenizer cannot use chat_format {chat_format!r}")
            # Meta's file in original/ goes with the template of the model folder above it.
            tokenizer = cls._from_tiktoken(path, folder.parent if folder.name == "original" else folder, chat_format)
        else:
            tokenizer = cls._from_sentencepiece(path, folder, chat_format)
        tokenizer.path = path
        tokenizer.date_string = date_string
        return tokenizer

    @classmethod
    def _from_tiktoken(cls, path: Path, model_dir: Path, chat_format: str | None) -> "Tokenizer":
        found = _chat_template_format(model_dir, required=False)
        if found is not None and found[0] not in LLAMA3_FORMATS:
            raise ValueError(f"{path}: a tiktoken (Llama-3) tokenizer beside a {found[0]} chat template")
        if found is not None and chat_format not in (None, found[0]):
            raise ValueError(f"{path}: its chat template is {found[0]}; it cannot use chat_format {chat_format!r}")
        chat_format = found[0] if found else chat_format or "llama3"
        ranks = _read_bpe_ranks(path)
        names = LLAMA3_SPECIALS if chat_format == "llama3" else \
            [LLAMA31_RENAMED.get(len(ranks) + i, name) for i, name in enumerate(LLAMA3_SPECIALS)]
        special = {name: len(ranks) + i for i, name in enumerate(names)}
        encoding = tiktoken.Encoding(path.stem, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        return cls("tiktoken", chat_format, encoding, special)

    @classmethod
    def _from_sentencepiece(cls, path: Path, model_dir: Path, chat_format: str | None) -> "Tokenizer":
        if chat_format in ("chatml", "llama3.1", "llama3.2"):
            comes_with = "a tokenizer.json" if chat_format == "chatml" else "Llama-3's tiktoken file"
            raise ValueError(f"{path}: chat_format {chat_format!r} comes with {comes_with}, not a tokenizer.model")
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: neither a tiktoken BPE file nor a sentencepiece model ({e})") from None
        control = _llama3_control_pieces(sp, path)
        if chat_format is None:
            chat_format = "llama3" if control else _chat_format_from_config(model_dir, path)
        if chat_format == "llama3":
            if not control:
                raise ValueError(f"{path}: chat_format 'llama3' needs the pieces {', '.join(LLAMA3_CONTROL)}")
            return cls("sentencepiece", "llama3", sp, control)
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ValueError(f"{path}: the sentencepiece model has no bos or eos piece")
        return cls("sentencepiece", chat_format, sp, {"<s>": sp.bos_id(), "</s>": sp.eos_id()})

    @classmethod
    def _from_tokenizer_json(cls, path: Path, chat_format: str | None) -> "Tokenizer":
        try:
            model = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from None
        found, default_system = _chat_template_format(path.parent)
        if chat_format not in (None, found):
            raise ValueError(f"{path}: its chat template is {found}; it cannot use chat_format {chat_format!r}")
        # Llama-3.x's tokenizer.json is its tiktoken file in another form (same ids, though without Meta's cut
        # of very long runs).
        names = CHATML_SPECIALS if found == "chatml" else \
            LLAMA3_CONTROL + (["<|eom_id|>"] if found != "llama3" else [])
        special = {name: model.token_to_id(name) for name in names}
        missing = [name for name, i in special.items() if i is None]
        if missing:
            raise ValueError(f"{path}: the {found} template needs the tokens {', '.join(missing)}")
        # Without this, text that spells an added token (<|im_end|>) is encoded as that token.
        model.encode_special_tokens = True
        return cls("tokenizers", found, model, special, default_system)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS, and special-token text stays text."""
        if self.kind == "sentencepiece":
            return self.model.encode(text)
        if self.kind == "tokenizers":
            return self.model.encode(text, add_special_tokens=False).ids
        return [t for chunk in _tiktoken_chunks(text) for t in self.model.encode_ordinary(chunk)]

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids])

    # ------------------------------------------------------------------------------------------------
    # 2. Chat templates

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of a conversation, equal to the model's official chat template (BOS first, but for
        ChatML, which has none).

        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. add_generation_prompt
        appends Llama-3's or ChatML's assistant header; Mistral and Llama-2 prompts already end in "[/INST]".
        """
        self.check_chat(messages)
        if self.chat_format in LLAMA3_FORMATS:
            return self._llama3(messages, add_generation_prompt)
        if self.chat_format == "chatml":
            return self._chatml(messages, add_generation_prompt)
        if self.chat_format == "mistral":
            return self._mistral(messages)
        return self._llama2(messages)

    def check_chat(self, messages, where: str = "messages") -> None:
        """What apply_chat_template needs of `messages`; a ValueError starting with `where` (a file and
        record, for messages read from one) otherwise."""
        check_messages(messages, where)
        if self.chat_format in ("mistral", "llama2"):
            _check_turn_order(messages, self.chat_format, where)

    def _llama3(self, messages, add_generation_prompt):
        # <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>,
        # content trimmed (HF template `| trim`, Meta's ChatFormat `.strip()`).
        eot = self.special["<|eot_id|>"]
        ids = [self.bos_id]
        if self.chat_format != "llama3":
            # Llama-3.1/3.2's templates (without tools) always open with a system turn: the knowledge cutoff,
            # today's date, a blank line, then the first message's text if it is a system one (else nothing).
            has_system = messages[0]["role"] == "system"
            text = LLAMA31_SYSTEM.format(date=self.today()) + (messages[0]["content"].strip() if has_system else "")
            ids += self._llama3_header("system") + self.encode(text) + [eot]
            messages = messages[has_system:]
        for m in messages:
            ids += self._llama3_header(m["role"]) + self.encode(m["content"].strip()) + [eot]
        if add_generation_prompt:
            ids += self._llama3_header("assistant")
        return ids

    def today(self) -> str:
        """The "Today Date" of Llama-3.1/3.2's system turn: date_string if set, else what the template
        writes (3.2: transformers' strftime_now("%d %b %Y"), the local date; 3.1: 26 Jul 2024)."""
        if self.date_string is not None:
            return self.date_string
        return datetime.now().strftime("%d %b %Y") if self.chat_format == "llama3.2" else LLAMA31_DATE

    def _llama3_header(self, role: str) -> list[int]:
        start, end = self.special["<|start_header_id|>"], self.special["<|end_header_id|>"]
        return [start] + self.encode(role) + [end] + self.encode("\n\n")

    def _chatml(self, messages, add_generation_prompt):
        # SmolLM2's template: per message <|im_start|>{role}\n{content}<|im_end|>\n, content as is, after its
        # default system message when the first message is not a system one. HF encodes the text between
        # special tokens piece by piece, so we do too: "{role}\n{content}" in one piece, since the
        # pre-tokenizer can join the newline with spaces that start the content.
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        start = self.special["<|im_start|>"]
        ids = []
        for m in messages:
            ids += [start] + self.encode(f"{m['role']}\n{m['content']}") + [self.eos_id] + self.encode("\n")
        if add_generation_prompt:
            ids += [start] + self.encode("assistant\n")
        return ids

    def _mistral(self, messages):
        # mistral-common's v1 tokenizer (Mistral-7B-Instruct v0.1/v0.2): <s>, then each user turn encoded as
        # "[INST] {content} [/INST]" and each assistant turn as "{content}" + </s>. Encoding each chunk on its
        # own gives the reply sentencepiece's leading "▁", i.e. "[/INST] reply"; the circuit-breaker code
        # overrides HF's template to ' ' + content + eos for exactly this. A system prompt is prepended to
        # the first user turn.
        ids = [self.bos_id]
        for m in _fold_system(messages, lambda system, user: f"{system}\n\n{user}"):
            if m["role"] == "user":
                ids += self.encode(f"[INST] {m['content']} [/INST]")
            else:
                ids += self.encode(m["content"]) + [self.eos_id]
        return ids

    def _llama2(self, messages):
        # Meta's Llama-2 chat_completion (equal to HF's template): the system prompt goes inside the first
        # user turn as "<<SYS>>\n{system}\n<</SYS>>\n\n"; each user/assistant pair is
        # <s> "[INST] {user} [/INST] {answer} " </s>; a final user turn is <s> "[INST] {user} [/INST]".
        turns = _fold_system(messages, lambda system, user: f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}")
        ids = []
        for i in range(0, len(turns), 2):
            user = turns[i]["content"].strip()
            if i + 1 < len(turns):
                answer = turns[i + 1]["content"].strip()
                ids += [self.bos_id] + self.encode(f"[INST] {user} [/INST] {answer} ") + [self.eos_id]
            else:
                ids += [self.bos_id] + self.encode(f"[INST] {user} [/INST]")
        return ids


# ----------------------------------------------------------------------------------------------------
# 3. Messages

# Roles any template here knows. Mistral and Llama-2 also need user/assistant turns in alternation.
ROLES = ("system", "user", "assistant")


def check_messages(messages, where: str) -> None:
    """A non-empty list of {"role", "content"} with string values and a known role; else ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected an object, got {type(m).__name__}")
        for field in ("role", "content"):
            if field not in m:
                raise ValueError(f"{where}[{i}]: field '{field}' is missing")
            if not isinstance(m[field], str):
                raise ValueError(f"{where}[{i}]: field '{field}' should be a string, got {type(m[field]).__name__}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}]: role {m['role']!r} is not one the chat templates know "
                             f"({', '.join(ROLES)})")


def _check_turn_order(messages: list[dict], chat_format: str, where: str) -> None:
    skip = int(messages[0]["role"] == "system")
    if skip == len(messages):
        raise ValueError(f"{where}: the {chat_format} template needs a user message after the system message")
    for i, m in enumerate(messages[skip:], skip):
        if m["role"] != ("user", "assistant")[(i - skip) % 2]:
            raise ValueError(f"{where}[{i}]: the {chat_format} template needs an optional system message, then "
                             f"user and assistant turns in alternation, starting with user; got {m['role']!r}")


def _fold_system(messages: list[dict], join: Callable[[str, str], str]) -> list[dict]:
    """Mistral and Llama-2 have no system turn: the system prompt goes into the first user message."""
    if messages[0]["role"] != "system":
        return messages
    first = {"role": "user", "content": join(messages[0]["content"], messages[1]["content"])}
    return [first] + messages[2:]


# ----------------------------------------------------------------------------------------------------
# 4. The template's tail

# Two user texts whose last characters differ, so their last tokens do, even with a character-level
# vocabulary.
_PROBES = ("Say alpha", "Name a dog")


def template_tail(tokenizer, messages_before: Sequence[dict] = ()) -> list[int]:
    """The template tokens that follow the user's text up to the end of the generation prompt.

    Two prompts, `messages_before` then a user turn with one of two probe texts: their common suffix is
    exactly the template's tail, whatever the chat format. Empty if the template adds nothing there."""
    a, b = (tokenizer.apply_chat_template([*messages_before, {"role": "user", "content": text}],
                                          add_generation_prompt=True) for text in _PROBES)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


# ----------------------------------------------------------------------------------------------------
# 5. Reading the files

def _find_tokenizer_file(model_dir: Path) -> Path:
    if model_dir.is_file():
        return model_dir
    # A tokenizer.model comes first: the project reads it without the tokenizers library, as before.
    candidates = [model_dir / "tokenizer.model", model_dir / "original" / "tokenizer.model",
                  model_dir / "tokenizer.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json "
                            f"(looked for {', '.join(map(str, candidates))})")


def _is_tiktoken_file(path: Path) -> bool:
    # A tiktoken BPE file is text, one "base64-token rank" per line; a sentencepiece model is a protobuf.
    with open(path, "rb") as f:
        first = f.readline(1000)
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", first) is not None


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}: line {n}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks should be 0..{len(ranks) - 1}, each once")
    return ranks


def _tiktoken_chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _MAX_CHUNK):
        chunk = text[start:start + _MAX_CHUNK]
        yield from (_split_long_runs(chunk) if _LONG_RUN.search(chunk) else [chunk])


def _split_long_runs(text: str) -> Iterator[str]:
    # Meta's _split_whitespaces_or_nonwhitespaces: cut after every _MAX_RUN characters of one run.
    run_len, run_is_space, cut = 0, text[:1].isspace(), 0
    for i, char in enumerate(text):
        if char.isspace() != run_is_space:
            run_len, run_is_space = 1, char.isspace()
        else:
            run_len += 1
            if run_len > _MAX_RUN:
                yield text[cut:i]
                cut, run_len = i, 1
    yield text[cut:]


def _llama3_control_pieces(sp, path: Path) -> dict[str, int]:
    """{piece: id} of Llama-3's control pieces in a sentencepiece vocabulary; {} when it has none."""
    found = {p: sp.piece_to_id(p) for p in LLAMA3_CONTROL if sp.id_to_piece(sp.piece_to_id(p)) == p}
    if not found:
        return {}
    missing = [p for p in LLAMA3_CONTROL if p not in found]
    if missing:
        raise ValueError(f"{path}: has some Llama-3 control pieces but not {', '.join(missing)}")
    plain = [p for p, i in found.items() if not sp.is_control(i)]
    if plain:
        # A user-defined piece is matched inside text, so a message could forge a turn with it.
        raise ValueError(f"{path}: {', '.join(plain)} must be control symbols (spm_train --control_symbols), "
                         "not user-defined pieces that text can spell")
    return found


def _chat_format_from_config(model_dir: Path, path: Path) -> str:
    config = model_dir / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: a sentencepiece tokenizer is Mistral's or Llama-2's and no {config} says which; "
                         "pass chat_format='mistral' or 'llama2'")
    settings = _read_json(config)
    architectures = (settings.get("architectures") if isinstance(settings, dict) else None) or []
    return "mistral" if "MistralForCausalLM" in architectures else "llama2"


def _chat_template_format(model_dir: Path, required: bool = True) -> tuple[str, str | None] | None:
    """(chat format, default system message) of the chat template beside a tokenizer file: transformers
    writes it to chat_template.jinja (newer) or tokenizer_config.json's "chat_template". None when there is
    no template and it is not `required` (Meta's tiktoken file alone is Llama-3's)."""
    jinja, config = model_dir / "chat_template.jinja", model_dir / "tokenizer_config.json"
    if jinja.is_file():
        source, template = jinja, jinja.read_text(encoding="utf-8")
    elif config.is_file():
        settings = _read_json(config)
        source, template = config, settings.get("chat_template") if isinstance(settings, dict) else None
    elif required:
        raise ValueError(f"{config}: not found; a tokenizer.json model needs its chat_template")
    else:
        return None
    if template is None and not required:
        return None
    if not isinstance(template, str):
        raise ValueError(f"{source}: no chat_template string")
    if template in KNOWN_TEMPLATES:
        return KNOWN_TEMPLATES[template]
    llama3 = LLAMA3_TEMPLATES.get(hashlib.sha256(template.encode("utf-8")).hexdigest())
    if llama3 is None:
        raise ValueError(f"{source}: this chat_template is not one the project implements (Meta's "
                         "Llama-3/3.1/3.2-Instruct and SmolLM2-Instruct's are); refusing to guess how it renders")
    return llama3, None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
