"""Chat templates: the model's own, or tunelab's plain one for models without; and rendering.

Lives with the models (not the trainers) because training, evaluation and serving all format
prompts through it, and must format them the same way.
"""

from __future__ import annotations


def fallback_chat_template(tokenizer) -> str:
    """A plain template for models without one; the EOS closes every assistant turn."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    return (
        "{{ '" + _jinja_escape(bos) + "' }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### User:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Assistant:\\n' + m['content'] + '" + _jinja_escape(eos) + "' + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    )


def _jinja_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


def ensure_chat_template(tokenizer) -> bool:
    """Give the tokenizer a chat template and a pad token if it lacks them. Returns True if the template was added."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = fallback_chat_template(tokenizer)
        added = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return added


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
