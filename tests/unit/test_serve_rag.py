"""tunelab serve --rag: a ladder-built index answers through the same OpenAI-compatible endpoint, passages
retrieved per request and put into the prompt as the ladder measured them, sources in an extra field the
official ``openai`` client keeps."""

from __future__ import annotations

import pytest

from tests.conftest import uvicorn_in_thread

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
openai = pytest.importorskip("openai")

DOCS = ["The cat is red.", "The dog is blue.", "The bird is green.", "The fish is yellow.", "The frog is purple."]


@pytest.fixture(scope="module")
def rag_server(tiny_model, tiny_bert, tmp_path_factory):
    import torch

    from tunelab.data import retrieval
    from tunelab.serve.server import ServeConfig, build
    from tunelab.workspace import Workspace

    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("rag")
    index = retrieval.build(DOCS, [f"doc{i}" for i in range(len(DOCS))], embedder=str(tiny_bert),
                            meta={"mode": "rag", "k": 2, "instruction": "Answer from the context.",
                                  "system_prompt": "You know animals."})
    index.save(d / "rag-index")
    app, registry, engine = build(ServeConfig(model=str(tiny_model), name="tiny", rag=str(d / "rag-index"),
                                              max_tokens=32), Workspace.resolve(d / "ws"))
    with uvicorn_in_thread(app) as url:
        yield url, registry, index
    engine.close()


def test_openai_client_gets_sources_and_the_augmented_prompt(rag_server):
    from tunelab.data import retrieval

    url, registry, index = rag_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "What color is the cat?"}]
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    sources = chat.model_extra["sources"]
    want = index.search(["What color is the cat?"], 2)[0]
    assert [s["id"] for s in sources] == [h.id for h in want] and len(sources) == 2
    assert [s["text"] for s in sources] == [h.text for h in want]
    # the prompt the model answered is the ladder's RAG prompt: system prompt, instruction, passages, question
    tok = registry.get("tiny").tokenizer
    augmented = retrieval.augment(msgs, want, "rag", "Answer from the context.", "You know animals.")
    prompt = tok.apply_chat_template(augmented, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens > len(tok(plain, add_special_tokens=False)["input_ids"])

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content


def test_a_wrong_rag_folder_fails_before_the_model_loads(tiny_model, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.serve.server import ServeConfig, build
    from tunelab.workspace import Workspace

    with pytest.raises(TunelabError, match="not a tunelab retrieval index"):
        build(ServeConfig(model=str(tiny_model), rag=str(tmp_path)), Workspace.resolve(tmp_path / "ws"))
