"""How one dataset row becomes chat turns: (user message, answer) pairs.

    row_turns({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
              "prompt", None, "file: row 1")       # -> [("Hi", "Hello")]
    row_turns({"prompt": "Hi", "output_len": 12}, "prompt", None, "...")   # -> [("Hi", 12)]

A conversation row holds "conversations" (ShareGPT: "from"/"value") or "messages" (OpenAI:
"role"/"content"); roles human/user and gpt/assistant (and ShareGPT's chatgpt, bard, bing) are
understood, system messages skipped. A prompt row holds a text field (prompt_field) and
optionally an output length (an int field) or an answer (a text field): OUTPUT_LEN_FIELDS and
ANSWER_FIELDS, or output_field when named.
"""

from __future__ import annotations

from typing import Any

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing", "model")
OUTPUT_LEN_FIELDS = ("output_len", "max_tokens", "output_tokens")
ANSWER_FIELDS = ("completion", "response", "output", "answer")

Turn = tuple[str, "str | int | None"]  # (user message, answer text / answer length / none)

def _message(msg: Any) -> tuple[str | None, str | None]:
    if not isinstance(msg, dict):
        return None, None
    role, text = msg.get("from", msg.get("role")), msg.get("value", msg.get("content"))
    return (role.lower() if isinstance(role, str) else None), (text if isinstance(text, str) else None)


def _conversation_turns(messages: Any) -> list[Turn]:
    """(user, answer) pairs from the start of a conversation, up to the first break in the
    user/assistant alternation (system messages are skipped); a last unanswered user message
    is a turn without an answer."""
    turns: list[Turn] = []
    user: str | None = None
    for msg in messages if isinstance(messages, list) else ():
        role, text = _message(msg)
        if role == "system" or text is None:
            continue
        if role in USER_ROLES and user is None and text:
            user = text
        elif role in ASSISTANT_ROLES and user is not None:
            turns.append((user, text))
            user = None
        else:
            break
    return turns + ([(user, None)] if user is not None else [])


def row_turns(row: Any, prompt_field: str, output_field: str | None, where: str) -> list[Turn]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be an object, got {type(row).__name__}")
    for key in ("conversations", "messages"):
        if row.get(key) is not None:
            return _conversation_turns(row[key])
    prompt = row.get(prompt_field)
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: no text field {prompt_field!r} (nor 'conversations'/'messages'); "
                         f"fields: {', '.join(map(str, row))}")
    candidates = (output_field,) if output_field else OUTPUT_LEN_FIELDS + ANSWER_FIELDS
    answer = next((row[k] for k in candidates if row.get(k) is not None), None)
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int))):
        raise ValueError(f"{where}: output field must be an int length or a text, got {answer!r:.60}")
    return [(prompt, answer)] if prompt else []
