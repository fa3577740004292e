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

from tunelab.data.formats import BadRecord, check_messages as _check_messages, required_text as _str

FORMATS = ("alpaca", "prompt_completion", "bedrock_cpt", "bedrock_conversation", "messages", "sharegpt",
           "preference", "classification", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}
HH_ASSISTANT = "\n\nAssistant:"


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


def to_canonical(rec: dict, fmt: str = "auto", mapping: dict[str, str] | None = None) -> dict:
    """One raw record → a canonical record; raises BadRecord with the reason."""
    if not isinstance(rec, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(rec).__name__}")
    if mapping:
        rec = {**rec, **{canon: rec[src] for canon, src in mapping.items() if src in rec}}
    fmt = detect(rec) if fmt == "auto" else fmt
    if fmt == "alpaca":
        user = _str(rec, "instruction")
        extra = _str(rec, "input", required=False)
        return {"messages": [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                             {"role": "assistant", "content": _str(rec, "output")}]}
    if fmt == "prompt_completion":
        if isinstance(rec.get("prompt"), list) and isinstance(rec.get("completion"), list):  # conversational
            return {"messages": _check_messages(rec["prompt"] + rec["completion"])}
        return {"messages": [{"role": "user", "content": _str(rec, "prompt")},
                             {"role": "assistant", "content": _str(rec, "completion")}]}
    if fmt == "bedrock_cpt":
        return {"text": _str(rec, "input")}
    if fmt == "text":
        return {"text": _str(rec, "text")}
    if fmt == "classification":
        label = rec.get("label")
        if label is None or str(label).strip() == "":
            raise BadRecord("field 'label' is missing or empty")
        return {"text": _str(rec, "text"), "label": str(label)}
    if fmt == "messages":
        return {"messages": _check_messages(rec.get("messages"))}
    if fmt == "sharegpt":
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise BadRecord("'conversations' must be a non-empty list")
        msgs = []
        for i, t in enumerate(conv):
            role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
            if role is None or not isinstance(t.get("value"), str):
                raise BadRecord(f"turn {i} must be {{'from': human|gpt|system, 'value': str}}")
            msgs.append({"role": role, "content": t["value"]})
        return {"messages": _check_messages(msgs)}
    if fmt == "bedrock_conversation":
        msgs = []
        for s in rec.get("system") or []:
            if isinstance(s, dict) and isinstance(s.get("text"), str):
                msgs.append({"role": "system", "content": s["text"]})
        for i, m in enumerate(rec.get("messages") or []):
            parts = m.get("content") if isinstance(m, dict) else None
            if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
                raise BadRecord(f"message {i}: content must be a list of {{'text': str}}")
            msgs.append({"role": m.get("role"), "content": "".join(p["text"] for p in parts)})
        return {"messages": _check_messages(msgs)}
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
            return {"prompt": prompt, **pair}
        chosen, rejected = _str(rec, "chosen"), _str(rec, "rejected")
        if rec.get("prompt"):
            return {"prompt": _str(rec, "prompt"), "chosen": chosen, "rejected": rejected}
        return split_hh(chosen, rejected)
    raise BadRecord(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")


def kind(rec: dict) -> str:
    if "messages" in rec:
        return "chat"
    if "chosen" in rec:
        return "preference"
    if "label" in rec:
        return "classification"
    return "text"


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
    raise BadRecord(f"a {k} record cannot be written as '{fmt}'")
