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


class Rendered(str):
    """Text as the model reads it that remembers where it came from.

    ``source``: the record's own text (a content-hash split keys on it, so which pairs are held out does not
    depend on how they are rendered). For a prompt rendered with a chat template, also its ``messages`` and the
    ``template``: a cut to fit a length then drops whole turns from the left and renders again
    (``train.numerics.fit_prompt``), instead of cutting the rendered text mid-turn. It is a ``str`` everywhere
    else; ``str(x)`` is the plain text.
    """

    source: str
    messages: list[dict] | None
    template: str | None

    def __new__(cls, text: str, source: str | None = None, messages: list[dict] | None = None,
                template: str | None = None):
        self = super().__new__(cls, text)
        self.source = str(text) if source is None else str(source)
        self.messages, self.template = messages, template
        return self

    def __reduce__(self):  # pickles (and copies) with its attributes
        return (type(self), (str(self), self.source, self.messages, self.template))


def render_prompt(tokenizer, messages: list[dict], source: str | None = None) -> Rendered:
    """``messages`` rendered with the tokenizer's chat template and its generation prompt, as :class:`Rendered`."""
    return Rendered(render(tokenizer, messages, add_generation_prompt=True), source, messages,
                    getattr(tokenizer, "chat_template", None))
