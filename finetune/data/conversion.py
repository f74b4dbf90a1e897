"""unsloth's `to_sharegpt` as the to_sharegpt stage runs it: the `to_sharegpt` section, and rows in the dataset's
schema made one-turn ShareGPT conversations, the columns of `merged_prompt` merged into the user turn (whitespace-only
cells blanked first). `tools.generate` asks its question through the same merge (`user_turn`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from finetune.config.params import require


@dataclass(frozen=True)
class ToSharegptConfig:
    merged_prompt: str  # how columns merge into the user turn; [[...]] is left out when its column is empty
    output_column_name: str  # column holding the assistant's answer
    conversation_extension: int  # training rows merged into one conversation (1 = none)
    random_state: int  # seed of unsloth's shuffles that pick the rows merged together

    def __post_init__(self) -> None:
        require(bool(prompt_columns(self.merged_prompt)), "to_sharegpt.merged_prompt must name a {column}")
        require(
            self.conversation_extension >= 1,
            f"to_sharegpt.conversation_extension must be >= 1, got {self.conversation_extension}",
        )
        require(self.random_state >= 0, f"to_sharegpt.random_state must be >= 0, got {self.random_state}")


OPTIONAL = re.compile(r"\[\[.+?\]\]", re.DOTALL)  # a [[...]] part of a merged prompt, as unsloth finds them


def prompt_columns(merged_prompt: str) -> list[str]:
    """The columns a merged prompt names, as unsloth reads them (`{{` and `}}` are literal braces):
    `prompt_columns("{user}[[ in: {system}]]")` -> `['user', 'system']`."""
    return list(dict.fromkeys(re.findall(r"\{(.+?)\}", re.sub(r"\{\{|\}\}", "", merged_prompt))))


def whitespace_only(cells: Any) -> Any:
    """Arrow mask of the cells that are non-empty and all whitespace; null cells are not."""
    import pyarrow.compute as pc

    return pc.fill_null(pc.utf8_is_space(cells), False)


def blank_whitespace(dataset: Dataset, columns: list[str]) -> Dataset:
    """Replace whitespace-only cells of `columns` with `""`.

    unsloth keeps an optional `[[...]]` part whenever its column is not exactly `""`; the real data's `"\\n"`
    system prompts would otherwise add an empty "Your input is:" block. `{"system": "\\n"}` -> `{"system": ""}`.
    """
    import pyarrow.compute as pc

    def blank(batch: Any) -> Any:
        for column in columns:
            cells = batch[column]
            blanked = pc.if_else(whitespace_only(cells), "", cells)
            batch = batch.set_column(batch.schema.get_field_index(column), column, blanked)
        return batch

    return dataset.with_format("arrow").map(blank, batched=True, desc="Blanking whitespace-only cells").with_format()


def convert(dataset: Dataset, config: ToSharegptConfig) -> Dataset:
    """unsloth's `to_sharegpt` with this stage's settings on whitespace-blanked rows: one conversation per row."""
    from unsloth.chat_templates import to_sharegpt

    columns = [c for c in prompt_columns(config.merged_prompt) if c in dataset.column_names]
    return to_sharegpt(
        blank_whitespace(dataset, columns),
        merged_prompt=config.merged_prompt,
        output_column_name=config.output_column_name,
        conversation_extension=1,
    )


def held_out_copies(conversations: Any, held_out: Any) -> Any:
    """Numpy mask of the one-turn ShareGPT `conversations` (an Arrow column) that are, turn for turn, one of the
    `held_out` ones, as rendered: exactly (fetch compared the rows' own texts whitespace aside; comparing every
    rendered answer so too would cost a third of the stage's time). Compared first by answer, chunk by chunk, so that
    no copy of the texts is made: the full turns are read only for the rows whose answer is a held-out answer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    def turns(conversation: list[dict[str, str]]) -> tuple:
        return tuple((turn["from"], turn["value"]) for turn in conversation)

    wanted = {turns(conversation) for conversation in held_out.to_pylist()}
    answers = pa.array(sorted({conversation[-1][1] for conversation in wanted}), pa.string())
    masks = [np.zeros(0, bool)]
    for chunk in conversations.chunks:
        offsets = chunk.offsets.to_numpy()
        answered = pc.is_in(chunk.values.field("value"), value_set=answers).to_numpy(zero_copy_only=False)
        mask = np.zeros(len(chunk), bool)
        for row in np.flatnonzero(answered[offsets[1:] - 1]):  # each conversation's last turn: its answer
            mask[row] = turns(chunk[int(row)].as_py()) in wanted
        masks.append(mask)
    return np.concatenate(masks)


def user_turn(question: str, system: str | None, config: ToSharegptConfig) -> str:
    """The user turn the training saw for a row with this `question` (the `user` column) and `system` text:
    `user_turn("Why?", "Be brief.", <the seed's settings>)` -> `"Why?\\nYour input is:\\nBe brief."`. A system text
    that the merged prompt has no `{system}` for is refused: no training row carried one."""
    columns = prompt_columns(config.merged_prompt)
    require(
        not system or "system" in columns,
        f"to_sharegpt.merged_prompt {config.merged_prompt!r} has no {{system}}: the training saw no system text",
    )
    row = dict.fromkeys(columns, "") | {"user": question, "system": system or "", config.output_column_name: ""}
    (conversation,) = convert(Dataset.from_list([row]), config)["conversations"]
    return conversation[0]["value"]  # ShareGPT: {"from": "human", "value": ...}
