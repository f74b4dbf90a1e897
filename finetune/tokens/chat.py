"""The `chat` section: how a conversation becomes text and token ids, the same way for every stage.

tokenize encodes every training and held-out conversation with this one module, once; evaluate's benchmarks and
`tools/generate.py` encode their prompts with it too. The chat template (the tokenizer's own unless `chat.template`
gives one) lays out BOS, system text, role tags and the end-of-turn token; `chat.think` decides what an answer is
inside it:

- `empty_block` (default): every answer is trained behind a think block, `<think>\\n{reasoning}\\n</think>\\n\\n
  {answer}`, empty when the data has no reasoning (Finance-Instruct has none). DeepSeek-R1's generation prompt
  ends in `<think>\\n`, so the prompt at inference is a prefix of what was trained, and the model learns to close
  the block and answer.
- `none`: answers are trained bare, any reasoning dropped (what the published template does to earlier turns),
  and the inference prompt stops where the template opens the answer, with no think block.

Text is tokenized in pieces cut where each answer starts and where it ends, so a prompt's tokens are exactly the
first tokens of the trained sequence (a `\\n` cannot merge across the cut) and the labels mask every token that is
not an answer's own: system text, questions, role tags and the part of the think block the prompt supplies.

Rendering the Jinja template for each of 518k conversations costs more than tokenizing them, so `fast_pieces` renders
it once per sequence of roles with placeholders (`layout`) and fills each conversation's contents in as strings;
`layout` refuses a template that does not pass contents through verbatim, and tokenize checks a sample of every
shard against the template itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finetune.config.params import require

THINK_POLICIES = ("empty_block", "none")
THINK_OPEN = "<think>\n"  # what DeepSeek-R1's generation prompt opens every answer with
THINK_CLOSE = "</think>"
IGNORE_INDEX = -100  # the label of a token that is not learnt
MARK = "\ue000{}\ue001"  # stands in for an answer while the template renders (Unicode private use: not in data)
MARKS = re.compile("\ue000(\\d+)\ue001")

PROBE_FILE = "chat_probe.json"  # tokenize writes `PROBE`'s token ids there; train checks its tokenizer against them
PROBE = [  # the conversation `Chat.check` renders: system text and two turns
    {"role": "system", "content": "You are a financial analyst."},
    {"role": "user", "content": "What is beta?"},
    {"role": "assistant", "content": "Sensitivity to the market."},
    {"role": "user", "content": "And alpha?"},
    {"role": "assistant", "content": "Return above the benchmark."},
]


@dataclass(frozen=True)
class ChatConfig:
    template: str | None = None  # Jinja chat template; null = the tokenizer's own
    think: str = "empty_block"  # how answers are written inside the template: empty_block or none

    def __post_init__(self) -> None:
        require(self.think in THINK_POLICIES, f"chat.think must be one of {THINK_POLICIES}, got {self.think!r}")
        require(self.template is None or bool(self.template.strip()), "chat.template must be a Jinja template or null")


def split_think(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant text: the one parser of the think block, for training and scoring.

    `split_think("<think>\\nr\\n</think>\\n\\nBeta.")` -> `("r", "Beta.")`; `split_think("Beta.")` -> `("", "Beta.")`.
    A generated answer (the prompt held `<think>\\n`) has no opening tag: `split_think("r</think> B")` -> `("r", "B")`.
    """
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    if not closed:
        return "", text.strip()
    return reasoning.strip().removeprefix("<think>").strip(), answer.strip()


def split_generated(text: str, opened: bool) -> tuple[str, str]:
    """(reasoning, final answer) of a generated text. A reasoning block never closed, whether the prompt opened it
    (`opened`: `chat.think` empty_block) or the model did, is reasoning cut short by `max_new_tokens`: no answer.

    `split_generated("r</think> 4", True)` -> `("r", "4")`; `split_generated("r 4", True)` -> `("r 4", "")`;
    `split_generated("<think>\\nr 4", False)` -> `("r 4", "")`; `split_generated("4", False)` -> `("", "4")`.
    """
    if THINK_CLOSE not in text and (opened or text.lstrip().startswith(THINK_OPEN.strip())):
        return text.strip().removeprefix(THINK_OPEN.strip()).strip(), ""
    return split_think(text)


def answer_text(content: str, think: str) -> tuple[str, str]:
    """(the part of an answer the prompt already holds, the part the model writes), for one assistant turn.

    `answer_text("Beta.", "empty_block")` -> `("<think>\\n", "\\n</think>\\n\\nBeta.")`;
    `answer_text("<think>r</think> Beta.", "none")` -> `("", "Beta.")`.
    """
    reasoning, closed, answer = content.partition(THINK_CLOSE)
    if closed:  # the answer's own trailing whitespace is trained as written
        reasoning, answer = split_think(content)[0], answer.lstrip()
    else:
        reasoning, answer = "", content
    if think == "none":
        return "", answer
    return THINK_OPEN, f"{reasoning}\n{THINK_CLOSE}\n\n{answer}"


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (the template writes them): the Rust core where there is
    one (no offsets computed), else the tokenizer's own call."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    # an earlier call with truncation=True (or padding) leaves the Rust core cutting (or padding) every text after
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


# A conversation's layout: the template's text between the answers, rendered once per sequence of roles, with a
# slot where each message's content goes. Each segment is (the prompt before an answer, split into literal text and
# slot numbers; the answer's index; the template's text after the answer, its end-of-turn token included).
Segment = tuple[list[str | int], int, str]
SLOT = "\ue002{}\ue003"  # a message's content while the layout renders (Unicode private use: not in data)
SLOTS = re.compile("\ue002(\\d+)\ue003")


class Chat:
    """A tokenizer with the chat settings applied: `render`, `pieces`, `encode` and `prompt_ids`."""

    def __init__(self, tokenizer: Any, config: ChatConfig) -> None:
        if config.template is not None:
            tokenizer.chat_template = config.template  # saved with the adapter's tokenizer, used at inference
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer of model.model_name has no chat template: set chat.template")
        self.tokenizer = tokenizer
        self.think = config.think
        self._layouts: dict[tuple[str, ...], tuple[list[Segment], list[str | int]] | None] = {}

    def split_generated(self, text: str) -> tuple[str, str]:
        """(reasoning, final answer) of a text generated after `prompt_ids`' generation prompt, which opens the
        reasoning block where `chat.think` is empty_block (`split_generated`)."""
        return split_generated(text, opened=self.think == "empty_block")

    def _segments(self, messages: list[dict[str, str]], open_answer: bool) -> tuple[list[tuple[str, int, str]], str]:
        """The template rendered with each answer replaced by a mark: (text before, answer index, end-of-turn text
        after) per answer, and the text after the last one."""
        if open_answer:
            messages = [*messages, {"role": "assistant", "content": ""}]
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        marked = [m | {"content": MARK.format(i)} if m["role"] == "assistant" else m for i, m in enumerate(messages)]
        text = self.tokenizer.apply_chat_template(marked, tokenize=False)
        found = [int(i) for i in MARKS.findall(text)]
        if found != answers:
            raise ValueError(
                f"the chat template did not render each assistant turn once, in order (turns {answers}, "
                f"rendered {found}): it cannot be trained on with chat.think={self.think!r}"
            )
        eos = self.tokenizer.eos_token or ""
        segments, start = [], 0
        for match in MARKS.finditer(text):
            end = match.end() + (len(eos) if eos and text.startswith(eos, match.end()) else 0)
            segments.append((text[start : match.start()], int(match[1]), text[match.end() : end]))
            start = end
        return segments, text[start:]

    def pieces(self, messages: list[dict[str, str]], open_answer: bool = False) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_answer) pieces, answers with their end-of-turn token.

        With `open_answer`, `messages` is the history before an answer and the pieces end with its prompt.
        """
        segments, tail = self._segments(messages, open_answer)
        pieces = self._assemble([([b], i, a) for b, i, a in segments], [] if open_answer else [tail], messages)
        return pieces[:-1] if open_answer else pieces  # an open answer's pieces stop at its prompt

    def fast_pieces(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """`pieces(messages)` from the layout of its roles, contents filled in as strings; the same text wherever
        the template passes contents through verbatim (`layout` checks that), else `pieces` itself."""
        found = self.layout(tuple(m["role"] for m in messages))
        return self.pieces(messages) if found is None else self._assemble(*found, messages)

    def _assemble(
        self, segments: list[Segment], tail: list[str | int], messages: list[dict[str, str]]
    ) -> list[tuple[str, bool]]:
        """Pieces from segments, each slot filled with its message's content and each answer split by `answer_text`
        (an answer index past `messages` is the open answer of a prompt: empty)."""

        def fill(parts: list[str | int]) -> str:
            return "".join(messages[p]["content"] if isinstance(p, int) else p for p in parts)

        out: list[tuple[str, bool]] = []
        for before, index, after in segments:
            given, written = answer_text(messages[index]["content"] if index < len(messages) else "", self.think)
            out += [(fill(before) + given, False), (written + after, True)]
        rest = fill(tail)
        return out + [(rest, False)] if rest else out

    def layout(self, roles: tuple[str, ...]) -> tuple[list[Segment], list[str | int]] | None:
        """The segments of every conversation with these roles, contents as slots, rendered once; None where the
        template does not pass a content through verbatim (it trims it, say): then each is rendered on its own."""
        if roles not in self._layouts:
            self._layouts[roles] = self._layout(roles)
        return self._layouts[roles]

    def _layout(self, roles: tuple[str, ...]) -> tuple[list[Segment], list[str | int]] | None:
        def render(pad: str) -> tuple[list[tuple[str, int, str]], str]:
            return self._segments(
                [{"role": r, "content": pad + SLOT.format(i) + pad} for i, r in enumerate(roles)], open_answer=False
            )

        segments, tail = render("")
        padded, padded_tail = render(" \n")  # a template that trims or rewrites contents changes these
        texts = [before for before, _, _ in segments] + [tail]
        padded_texts = [before for before, _, _ in padded] + [padded_tail]
        slots = [i for i, role in enumerate(roles) if role != "assistant"]
        if [int(i) for text in texts for i in SLOTS.findall(text)] != slots or [
            SLOTS.sub(lambda m: f" \n{m[0]} \n", text) for text in texts
        ] != padded_texts:
            return None

        def split(text: str) -> list[str | int]:  # literal text and slot numbers, alternating
            return [int(part) if i % 2 else part for i, part in enumerate(SLOTS.split(text))]

        return [(split(before), index, after) for before, index, after in segments], split(tail)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the model trains on it."""
        return "".join(text for text, _ in self.pieces(messages))

    def prompt(self, history: list[dict[str, str]]) -> str:
        """What the model is given to write the next answer: a prefix of `render(history + [that answer])`."""
        return "".join(text for text, _ in self.pieces(history, open_answer=True))

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids and labels (IGNORE_INDEX except on the answers' own tokens, end-of-turn included)."""
        return self.encode_many([messages])[0]

    def encode_many(
        self, conversations: list[list[dict[str, str]]], max_length: int | None = None
    ) -> list[tuple[list[int], list[int]]]:
        """`encode` of many conversations, tokenized in one batch, each cut to `max_length` tokens if given.

        BOS comes from the template alone.
        """
        split = [self.pieces(messages) for messages in conversations]
        ids = iter(token_ids(self.tokenizer, [text for pieces in split for text, _ in pieces]))
        out = []
        for pieces in split:
            input_ids: list[int] = []
            labels: list[int] = []
            for _, is_answer in pieces:
                piece = next(ids)
                input_ids += piece
                labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
            out.append((input_ids[:max_length], labels[:max_length]))
        return out

    def prompt_ids(self, history: list[dict[str, str]]) -> list[int]:
        """`prompt` as token ids, cut into pieces as training cut them: exactly the trained sequence's first ids."""
        texts = [text for text, _ in self.pieces(history, open_answer=True)]
        return [token for piece in token_ids(self.tokenizer, texts) for token in piece]

    def check(self, padding: bool) -> None:
        """Fail fast where the template or tokenizer breaks what training relies on.

        One BOS at most, each answer followed by EOS, every prompt a prefix (in tokens) of the trained sequence,
        and, where batches are padded (`padding`), a pad token that is not EOS: padding masked as EOS would teach
        the model never to stop.
        """
        tok = self.tokenizer
        ids, labels = self.encode(PROBE)
        if tok.bos_token_id is not None:
            require(ids.count(tok.bos_token_id) <= 1, f"the chat template and tokenizer write BOS twice: {ids[:4]}")
        for turn in (2, 4):
            require(
                self.render(PROBE[: turn + 1]).rstrip().endswith(tok.eos_token),
                f"the chat template does not end an assistant turn with EOS {tok.eos_token!r}: set chat.template",
            )
            prompt = self.prompt_ids(PROBE[:turn])
            require(
                ids[: len(prompt)] == prompt,
                f"the prompt of turn {turn} is not a prefix of the trained tokens with chat.think={self.think!r}",
            )
        learnt = [label for label in labels if label != IGNORE_INDEX]
        require(learnt.count(tok.eos_token_id) == 2, "each answer's EOS must carry a label")
        if padding:
            require(
                tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id,
                f"the tokenizer's pad token {tok.pad_token!r} must exist and differ from EOS {tok.eos_token!r}",
            )
