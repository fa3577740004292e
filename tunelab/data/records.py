"""Every supported record format → one canonical record (TRL key names), and back out.

Canonical kinds (see steps/base.py): chat ``{"messages"}``, preference ``{"prompt", "chosen",
"rejected"}``, classification ``{"text", "label"}``, raw text ``{"text"}``. Formats:

| name | fields |
|---|---|
| alpaca | instruction, input (optional), output |
| prompt_completion | prompt, completion (Bedrock fine-tuning JSONL) |
| bedrock_cpt | input (Bedrock continued pre-training) |
| bedrock_conversation | schemaVersion bedrock-conversation-2024: system [{text}], messages [{role, content: [{text}]}] |
| messages | OpenAI chat: messages [{role, content}] |
| sharegpt | conversations [{from: human/gpt/system, value}] |
| preference | prompt, chosen, rejected — or hh-rlhf whole transcripts (chosen, rejected only) |
| classification | text, label |
| text | text |
"""

from __future__ import annotations

import math
import re

FORMATS = ("alpaca", "prompt_completion", "bedrock_cpt", "bedrock_conversation", "messages", "sharegpt",
           "preference", "classification", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}
HH_ASSISTANT = "\n\nAssistant:"
ROLES = {"system", "user", "assistant"}
_NUMBERS = re.compile(r"(?<![\w-])\d+(?![\w-])")  # "byte 17", not the 8 of "UTF-8"


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason (never the record's text).

    ``kind`` groups reasons for counting (``"invalid UTF-8"`` for ``"invalid UTF-8 at byte 17"``):
    the console and the manifest count by kind, rejects.jsonl keeps the full reason.
    """

    def __init__(self, reason: str, kind: str | None = None):
        super().__init__(reason)
        self.kind = kind or reason_kind(reason)

    def __reduce__(self):  # keep ``kind`` across processes
        return (type(self), (str(self), self.kind))


def reason_kind(reason: str) -> str:
    """A reason's kind: the part before the first ':', numbers replaced by N, at most 80 characters."""
    return _NUMBERS.sub("N", reason.split(":")[0]).strip()[:80]


def check_messages(msgs: object) -> list[dict]:
    """Validate a chat: roles known, a system message only first, user/assistant alternating, ending with the assistant."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                or not isinstance(m.get("content"), str):
            raise BadRecord(f"message {i} must be {{'role': system|user|assistant, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    body = [m for m in out if m["role"] != "system"]
    if any(m["role"] == "system" for m in out[1:]):
        raise BadRecord("a system message may only come first")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise BadRecord(f"chat roles must alternate user/assistant starting with user (turn {i} is {m['role']})")
    if not body or body[-1]["role"] != "assistant":
        raise BadRecord("the conversation must end with an assistant message")
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        raise BadRecord("an assistant message is empty")
    return out


def required_text(rec: dict, key: str, required: bool = True) -> str:
    """``rec[key]`` as a non-empty string, or BadRecord saying what is wrong."""
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise BadRecord(f"field '{key}' is missing or empty")
        return ""
    if not isinstance(v, str):
        raise BadRecord(f"field '{key}' must be a string, got {type(v).__name__}")
    return v



def detect(rec: dict) -> str:
    """The format of one record, from its keys."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    k = set(rec)
    if rec.get("schemaVersion") == "bedrock-conversation-2024" or ("messages" in k and _bedrock_like(rec)):
        return "bedrock_conversation"
    if {"chosen", "rejected"} <= k:
        return "preference"
    if "messages" in k:
        return "messages"
    if "conversations" in k:
        return "sharegpt"
    if {"instruction", "output"} <= k:
        return "alpaca"
    if {"prompt", "completion"} <= k:
        return "prompt_completion"
    if {"text", "label"} <= k:
        return "classification"
    if "text" in k:
        return "text"
    if "input" in k and len(k - {"id", "meta"}) == 1:
        return "bedrock_cpt"
    raise BadRecord(f"unknown format: keys {sorted(k)[:8]}")


def _bedrock_like(rec: dict) -> bool:
    msgs = rec.get("messages")
    return isinstance(msgs, list) and bool(msgs) and isinstance(msgs[0], dict) and isinstance(msgs[0].get("content"), list)


def split_hh(chosen: str, rejected: str) -> dict:
    """hh-rlhf style: both transcripts share the prompt up to the last "\\n\\nAssistant:"."""
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRecord("preference transcript has no '\\n\\nAssistant:' turn to split on")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise BadRecord("chosen and rejected transcripts do not share the prompt")
    c, r = chosen[len(prompt):].strip(), rejected[len(prompt):].strip()
    if not c or not r:
        raise BadRecord("empty chosen or rejected response")
    # the prompt keeps its trailing "Assistant:" cue; responses keep the space that followed it
    return {"prompt": prompt.lstrip(), "chosen": " " + c, "rejected": " " + r}


# hh-rlhf turn markers. A marker opens a turn only at the start of the text or after a blank line ("\n\n",
# more whitespace allowed): the words "Human:"/"Assistant:" inside a turn's text are text (73 of
# hh-rlhf-harmless-base's 2,312 transcripts have them there, e.g. "Assistant: Human: I think ...")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_MARK = re.compile(r"Human:|Assistant:")


def _hh_turns(text: str) -> list[tuple[str, int, int]]:
    """(role word, where the whitespace before the marker starts, where the marker ends) of each turn marker.

    Linear in the text: a whitespace run is walked back over once, by the one marker that ends it (a
    regex with the blank line in it backtracks quadratically on long runs of whitespace)."""
    out = []
    for m in _HH_MARK.finditer(text):
        j, newlines = m.start(), 0
        while j > 0 and text[j - 1].isspace():
            j -= 1
            newlines += text[j] == "\n"
        if j == 0 or newlines >= 2:
            out.append((m.group()[:-1], j, m.end()))
    return out


def is_hh_prompt(text: object) -> bool:
    """Whether ``text`` looks like an hh-rlhf prompt: it starts with a "Human:" or "Assistant:" turn and ends with
    the "Assistant:" cue (``split_hh``'s prompts; a cheap test, :func:`hh_messages` decides)."""
    if not isinstance(text, str):
        return False
    head, tail = text.lstrip(), text.rstrip()
    return head.startswith(("Human:", "Assistant:")) and tail.endswith("Assistant:")


def hh_messages(text: str) -> list[dict] | None:
    """An hh-rlhf prompt ("\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:") → its turns as chat messages, in
    order (Human → user, Assistant → assistant, each text stripped); the final "Assistant:" cue, which the
    response answers, is left out (it becomes the chat template's generation prompt). None when ``text`` is not
    an hh-rlhf prompt (no turn marker at its start, or no empty "Assistant:" cue at its end). A transcript may
    start with an Assistant turn and repeat a role: the turns are kept as written. An empty turn is a BadRecord."""
    if not is_hh_prompt(text):
        return None
    turns = _hh_turns(text)
    # the first marker opens the text (no preamble) and the last is an empty "Assistant:" cue
    if not turns or turns[0][1] != 0 or turns[-1][0] != "Assistant" or text[turns[-1][2]:].strip():
        return None
    if len(turns) == 1:
        raise BadRecord("hh-rlhf prompt has no turn before its 'Assistant:' cue")
    msgs = []
    for i, (who, _, end) in enumerate(turns[:-1]):
        content = text[end: turns[i + 1][1]].strip()
        if not content:
            raise BadRecord(f"hh-rlhf transcript: turn {i + 1} ({who}) is empty")
        msgs.append({"role": HH_ROLES[who], "content": content})
    return msgs


def hh_text(messages: list[dict], generation_prompt: bool = True) -> str:
    """Chat messages (user/assistant) written as an hh-rlhf transcript, ending with the "Assistant:" cue when
    ``generation_prompt``: the inverse of :func:`hh_messages`."""
    words = {"user": "Human", "assistant": "Assistant"}
    if any(m["role"] not in words for m in messages):
        raise BadRecord("an hh-rlhf transcript has only user and assistant turns")
    text = "".join(f"\n\n{words[m['role']]}: {m['content']}" for m in messages)
    return text + HH_ASSISTANT if generation_prompt else text


def to_canonical(rec: dict, fmt: str = "auto", mapping: dict[str, str] | None = None) -> dict:
    """One raw record → a canonical record; raises BadRecord with the reason."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    if mapping:
        rec = {**rec, **{canon: rec[src] for canon, src in mapping.items() if src in rec}}
    if fmt != "auto" and fmt not in FORMATS:
        raise BadRecord(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}", "unknown format")
    fmt = detect(rec) if fmt == "auto" else fmt
    if fmt == "alpaca":
        user = required_text(rec, "instruction")
        extra = required_text(rec, "input", required=False)
        return {"messages": [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                             {"role": "assistant", "content": required_text(rec, "output")}]}
    if fmt == "prompt_completion":
        if isinstance(rec.get("prompt"), list) and isinstance(rec.get("completion"), list):  # conversational
            return {"messages": check_messages(rec["prompt"] + rec["completion"])}
        return {"messages": [{"role": "user", "content": required_text(rec, "prompt")},
                             {"role": "assistant", "content": required_text(rec, "completion")}]}
    if fmt == "bedrock_cpt":
        return {"text": required_text(rec, "input")}
    if fmt == "text":
        return {"text": required_text(rec, "text")}
    if fmt == "classification":
        return {"text": required_text(rec, "text"), "label": _label(rec.get("label"))}
    if fmt == "messages":
        return {"messages": check_messages(rec.get("messages"))}
    if fmt == "sharegpt":
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise BadRecord("'conversations' must be a non-empty list")
        msgs = []
        for i, t in enumerate(conv):
            who = t.get("from") if isinstance(t, dict) else None
            role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadRecord(f"turn {i} must be {{'from': human|gpt|system, 'value': str}}")
            msgs.append({"role": role, "content": t["value"]})
        return {"messages": check_messages(msgs)}
    if fmt == "bedrock_conversation":
        msgs = []
        system, turns = rec.get("system") or [], rec.get("messages") or []
        if not isinstance(system, list) or not isinstance(turns, list):
            raise BadRecord("'system' and 'messages' must be lists")
        for s in system:
            if isinstance(s, dict) and isinstance(s.get("text"), str):
                msgs.append({"role": "system", "content": s["text"]})
        for i, m in enumerate(turns):
            parts = m.get("content") if isinstance(m, dict) else None
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
                raise BadRecord(f"message {i}: content must be a list of {{'text': str}}")
            msgs.append({"role": m.get("role"), "content": "".join(p["text"] for p in parts)})
        return {"messages": check_messages(msgs)}
    if fmt == "preference":
        if isinstance(rec.get("conversations"), list):  # ShareGPT preference (LLaMA-Factory dpo format)
            prompt = to_canonical({"conversations": rec["conversations"] + [{"from": "gpt", "value": "x"}]},
                                  "sharegpt")["messages"][:-1]
            pair = {}
            for key in ("chosen", "rejected"):
                v = rec.get(key)
                text = v.get("value") if isinstance(v, dict) else v
                if not isinstance(text, str) or not text.strip():
                    raise BadRecord(f"field '{key}' is missing or empty")
                pair[key] = [{"role": "assistant", "content": text}]
            return _distinct({"prompt": prompt, **pair})
        chosen, rejected = required_text(rec, "chosen"), required_text(rec, "rejected")
        if rec.get("prompt"):
            return _distinct({"prompt": required_text(rec, "prompt"), "chosen": chosen, "rejected": rejected})
        return _distinct(split_hh(chosen, rejected))
    raise BadRecord(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")


def _label(label: object) -> str:
    """A classification label as a string; missing, empty, NaN/inf and non-scalar labels are rejected."""
    if label is None or (isinstance(label, str) and not label.strip()):
        raise BadRecord("field 'label' is missing or empty")
    if isinstance(label, float) and not math.isfinite(label) or isinstance(label, str) and label.strip().lower() == "nan":
        # pandas writes a missing value as NaN; json.loads reads NaN/Infinity as floats
        raise BadRecord("field 'label' is NaN (a missing value)")
    if not isinstance(label, (str, int, float)):
        raise BadRecord(f"field 'label' must be a string or a number, got {type(label).__name__}")
    return str(label)


def _distinct(pair: dict) -> dict:
    """A preference pair whose chosen and rejected responses differ (an identical pair teaches nothing)."""
    if _plain(pair["chosen"]) == _plain(pair["rejected"]):
        raise BadRecord("chosen and rejected are identical")
    return pair


def _plain(v: object) -> object:
    if isinstance(v, str):
        return v.strip()
    return [(m["role"], m["content"].strip()) for m in v]


def find_surrogate(rec: dict) -> str | None:
    """The first field of a canonical record holding a lone surrogate (text that is not valid Unicode and
    cannot be written as UTF-8, e.g. from a JSON escape ``"\\ud800"``), or None."""
    for k, v in rec.items():
        if k == "meta":
            continue
        if isinstance(v, str):
            if not _encodable(v):
                return k
        elif isinstance(v, list):
            for i, m in enumerate(v):
                if isinstance(m, dict) and isinstance(m.get("content"), str) and not _encodable(m["content"]):
                    return f"{k}.{i}.content"
    return None


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def kind(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "chosen" in rec:
        return "preference"
    if "label" in rec:
        return "classification"
    return "text"


# which formats each record kind can be written as (chat → alpaca/prompt_completion: single-turn chats only)
EXPORTABLE = {"chat": ("messages", "bedrock_conversation", "sharegpt", "alpaca", "prompt_completion", "text",
                       "bedrock_cpt"),
              "preference": ("preference",),
              "classification": ("classification", "text"),
              "text": ("text", "bedrock_cpt")}


def export(rec: dict, fmt: str) -> dict:
    """A canonical record in an external format (e.g. Bedrock-ready JSONL). Raises BadRecord if it cannot be."""
    k = kind(rec)
    if k == "chat":
        msgs = rec["messages"]
        system = [m["content"] for m in msgs if m["role"] == "system"]
        turns = [m for m in msgs if m["role"] != "system"]
        single = len(turns) == 2
        if fmt == "messages":
            return {"messages": msgs}
        if fmt == "bedrock_conversation":
            out = {"schemaVersion": "bedrock-conversation-2024",
                   "messages": [{"role": m["role"], "content": [{"text": m["content"]}]} for m in turns]}
            if system:
                out["system"] = [{"text": s} for s in system]
            return out
        if fmt == "sharegpt":
            inv = {"user": "human", "assistant": "gpt", "system": "system"}
            return {"conversations": [{"from": inv[m["role"]], "value": m["content"]} for m in msgs]}
        if fmt in ("alpaca", "prompt_completion") and single:
            user = ("\n\n".join(system) + "\n\n" if system else "") + turns[0]["content"]
            if fmt == "alpaca":
                return {"instruction": user, "input": "", "output": turns[1]["content"]}
            return {"prompt": user, "completion": turns[1]["content"]}
        if fmt in ("text", "bedrock_cpt"):
            text = "\n\n".join(m["content"] for m in msgs)
            return {"input": text} if fmt == "bedrock_cpt" else {"text": text}
    if k == "preference" and fmt == "preference":
        return {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
    if k == "classification" and fmt in ("classification", "text"):
        return {"text": rec["text"], "label": rec["label"]} if fmt == "classification" else {"text": rec["text"]}
    if k == "text" and fmt in ("text", "bedrock_cpt"):
        return {"input": rec["text"]} if fmt == "bedrock_cpt" else {"text": rec["text"]}
    if k == "chat" and fmt in EXPORTABLE["chat"]:
        raise BadRecord(f"a multi-turn chat cannot be written as '{fmt}' (single-turn only)")
    raise BadRecord(f"a {k} record cannot be written as '{fmt}'")
