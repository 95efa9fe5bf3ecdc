"""Chat formatting: prompt messages -> token ids, responses -> ids ending in <|im_end|>.

Uses the tokenizer's own chat template when it has one (ours, Qwen2's); otherwise the minimal
ChatML form `<|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n`.
Special tokens are never added by `encode` itself: the template already holds them.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from spark_mcore.types import Prompt

IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of a single token string, or None when the vocabulary does not have it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(tid)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    """The prompt text including the opening of the assistant turn."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    parts = [f"{IM_START_TOKEN}{m['role']}\n{m['content']}{IM_END_TOKEN}\n" for m in messages]
    return "".join(parts) + f"{IM_START_TOKEN}assistant\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of `prompt.messages` rendered as a chat, ending with the assistant header."""
    if not prompt.messages:
        raise ValueError(f"prompt {prompt.id!r} has no messages")
    return list(tokenizer.encode(render_chat(tokenizer, prompt.messages), add_special_tokens=False))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a response: <|im_end|> (if the vocabulary has it) and eos, deduplicated."""
    ids: list[int] = []
    for tid in (_token_id(tokenizer, IM_END_TOKEN), tokenizer.eos_token_id):
        if tid is not None and int(tid) not in ids:
            ids.append(int(tid))
    if not ids:
        raise ValueError(
            "the tokenizer has neither <|im_end|> nor an eos token: generation would never stop; set eos_token"
        )
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of an assistant response followed by its end-of-turn token (<|im_end|>, else eos)."""
    end = stop_token_ids(tokenizer)[0]
    return list(tokenizer.encode(text, add_special_tokens=False)) + [end]


__all__ = ["render_chat", "encode_prompt", "stop_token_ids", "encode_response"]
