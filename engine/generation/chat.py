"""Chat messages and how they become a prompt: the model's chat template, or a plain fallback."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InputError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation. ``role`` is system, user or assistant."""

    role: str
    content: str


def validate_messages(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """Checked tuple of messages; the last one must be a non-empty user turn."""
    messages = tuple(messages)
    if not messages:
        raise InputError("The conversation is empty: type a message to send.")
    for m in messages:
        if m.role not in ROLES:
            raise InputError(f"Unknown chat role {m.role!r}: use one of {', '.join(ROLES)}.")
    if messages[-1].role != "user" or not messages[-1].content.strip():
        raise InputError("The last chat message must be a non-empty user message: type one.")
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply starts.

    Uses the tokenizer's chat template when it has one; otherwise a plain
    ``Role: content`` transcript ending with ``Assistant:``.
    """
    messages = validate_messages(messages)
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
    lines = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def conversation(
    history: Sequence[tuple[str, str]], message: str, system: str = ""
) -> list[ChatMessage]:
    """The messages for a chat turn: an optional system message, the earlier turns
    (``(role, content)`` pairs, oldest first) and the new user ``message``."""
    messages = [ChatMessage("system", system.strip())] if system.strip() else []
    messages += [ChatMessage(role, content) for role, content in history]
    messages.append(ChatMessage("user", message))
    return messages
