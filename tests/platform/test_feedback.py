"""Human feedback: campaigns, blind A/B, labelling, several labelers, kappa, export → dataset → reward job."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("sklearn")


def _keys(srv):
    from tunelab.platform.auth import create_key

    out = {}
    for name, role, project in (("admin", "admin", "alpha"), ("trainer", "trainer", "alpha"),
                                ("l1", "labeler", "alpha"), ("l2", "labeler", "alpha"), ("l3", "labeler", "alpha"),
                                ("viewer", "viewer", "alpha"), ("other", "trainer", "beta")):
        out[name] = create_key(srv.store, role, project, name=name)[1]
    return out


def _call(srv, key, method, path, **kw):
    import httpx2 as httpx

    return httpx.request(method, srv.url + path, headers={"Authorization": f"Bearer {key}"} if key else {},
                         timeout=120, **kw)


def _ab_items(n: int) -> list[dict]:
    # a clear preference: "b" answers with the color rule, "a" does not
    return [{"prompt": f"What color is animal {i}?", "a": f"I do not know ({i}).", "b": f"Animal {i} is red."}
            for i in range(n)]


C = "/v1/tunelab/feedback/campaigns"


def test_roles_blindness_and_several_labelers(make_server):
    srv = make_server(worker=False)
    k = _keys(srv)
    body = {"kind": "ab", "name": "colors", "items": _ab_items(12), "models": ["base", "tuned"],
            "labelers_per_item": 2, "instructions": "Pick the answer that names a color."}
    # a labeler and a viewer cannot create campaigns; a trainer can
    assert _call(srv, k["l1"], "POST", C, json=body).status_code == 403
    assert _call(srv, k["viewer"], "POST", C, json=body).status_code == 403
    r = _call(srv, k["trainer"], "POST", C, json=body)
    assert r.status_code == 200, r.text
    camp = r.json()
    cid = camp["id"]
    assert camp["status"] == "open" and camp["items"] == 12 and camp["models"] == {"a": "base", "b": "tuned"}

    # a labeler sees the campaign (no models), cannot read datasets or create jobs
    seen = _call(srv, k["l1"], "GET", f"{C}/{cid}").json()
    assert "models" not in seen and "votes" not in seen and "datasets" not in seen
    assert [c["id"] for c in _call(srv, k["l1"], "GET", C).json()["data"]] == [cid]
    assert _call(srv, k["l1"], "GET", "/v1/tunelab/datasets").status_code == 403
    assert _call(srv, k["l1"], "POST", "/v1/tunelab/jobs", json={"recipe": {"recipe": "sft"}}).status_code == 403
    # a viewer reads but cannot judge; another project does not see it
    assert _call(srv, k["viewer"], "GET", f"{C}/{cid}").status_code == 200
    assert _call(srv, k["viewer"], "GET", f"{C}/{cid}/next").status_code == 403
    assert _call(srv, k["viewer"], "POST", f"{C}/{cid}/judgments",
                 json={"item_id": "x", "choice": "left"}).status_code == 403
    assert _call(srv, k["other"], "GET", f"{C}/{cid}").status_code == 404
    assert _call(srv, k["other"], "GET", C).json()["data"] == []

    by_prompt = {it["prompt"]: it for it in body["items"]}
    orders: dict[str, dict[str, str]] = {}
    done = {}
    for who in ("l1", "l2", "l3"):
        orders[who] = {}
        n = 0
        while True:
            nxt = _call(srv, k[who], "GET", f"{C}/{cid}/next")
            assert nxt.status_code == 200
            j = nxt.json()
            if j["done"]:
                break
            text = json.dumps(j)
            assert "base" not in text and "tuned" not in text and "models" not in j  # blind: no model names
            assert {j["left"], j["right"]} == {by_prompt[j["prompt"]]["a"], by_prompt[j["prompt"]]["b"]}
            orders[who][j["item_id"]] = "a" if j["left"] == by_prompt[j["prompt"]]["a"] else "b"
            # the same item shows the same order to the same labeler again
            assert _call(srv, k[who], "GET", f"{C}/{cid}/next").json()["left"] == j["left"]
            # always pick the answer that names a color, wherever it is shown
            choice = "left" if "red" in j["left"] else "right"
            r = _call(srv, k[who], "POST", f"{C}/{cid}/judgments", json={"item_id": j["item_id"], "choice": choice,
                                                                        "reason": "names a color"})
            assert r.status_code == 200 and r.json()["replaced"] is False
            n += 1
        done[who] = n
    # 12 items x 2 labelers: the first two labelers take them all, fewest answers first; the third finds none left
    assert done == {"l1": 12, "l2": 12, "l3": 0}
    # the order shown is the one drawn per (item, labeler) with the campaign's secret salt
    from tunelab.platform.feedback import left_side

    salt = srv.store.get_campaign(cid, "alpha")["spec"]["salt"]
    lab = {who: srv.store.list_keys()[[x["name"] for x in srv.store.list_keys()].index(who)]["id"] for who in orders}
    assert all(orders[w][i] == left_side(salt, i, lab[w]) for w in ("l1", "l2") for i in orders[w])

    view = _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()
    assert view["votes"] == {"b": 24}  # left/right mapped back to the model that wrote it
    prog = view["progress"]
    assert prog["items_complete"] == 12 and prog["answers"] == 24
    assert {(x["name"], x["answered"]) for x in prog["labelers"]} == {("l1", 12), ("l2", 12)}
    (pair,) = view["agreement"]["pairs"]
    assert pair["n"] == 12 and pair["kappa"] is None and pair["raw_agreement"] == 1.0  # one category: undefined

    # the campaign's owners browse items with their answers, unblinded; labelers cannot
    page = _call(srv, k["viewer"], "GET", f"{C}/{cid}/items", params={"limit": 5}).json()
    assert page["total"] == 12 and len(page["data"]) == 5 and page["has_more"]
    assert all(x["votes"] == {"b": 2} and len(x["answers"]) == 2 for x in page["data"])
    assert _call(srv, k["l1"], "GET", f"{C}/{cid}/items").status_code == 403

    # a second answer replaces the first; an unknown item is a 400 naming the param
    item = next(iter(orders["l1"]))
    r = _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": item, "choice": "tie"})
    assert r.status_code == 200 and r.json()["replaced"] is True
    assert _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()["votes"] == {"b": 23, "tie": 1}
    r = _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": "item-nope", "choice": "left"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "item_id"
    r = _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": item, "choice": "a"})
    assert r.status_code == 400  # choices are left/right/tie/skip only
    r = _call(srv, k["l1"], "POST", f"{C}/{cid}/labels", json={"item_id": item, "label": "x"})
    assert r.status_code == 400 and "judgments" in r.json()["error"]["message"]
    # every change was audited
    actions = [a["action"] for a in srv.store.audit_log(1000)]
    assert sum(a == f"POST {C}/{cid}/judgments" for a in actions) >= 25


def test_left_right_order_varies_across_items_and_labelers():
    from tunelab.platform.feedback import left_side

    grid = [[left_side("salt", f"item-{i}", f"key-{j}") for j in range(4)] for i in range(50)]
    assert {x for row in grid for x in row} == {"a", "b"}
    assert sum(len(set(row)) == 2 for row in grid) > 25  # the labelers of one item see different orders
    assert {left_side("salt", "item-1", "key-1") for _ in range(5)} == {grid[1][1]}  # stable per pair
    assert [left_side("other", f"item-{i}", "key-0") for i in range(50)] != [row[0] for row in grid]


def test_kappa_against_a_hand_computed_value(make_server):
    """Two labelers on 10 texts, agreeing on 8: p_o = 0.8, each uses 'pos' 5 times so p_e = 0.5,
    kappa = (0.8 - 0.5) / (1 - 0.5) = 0.6. A third labeler on 1 item: n = 1, kappa undefined."""
    srv = make_server(worker=False)
    k = _keys(srv)
    texts = [f"review {i}" for i in range(10)]
    camp = _call(srv, k["trainer"], "POST", C, json={"kind": "label", "items": [{"text": t} for t in texts],
                                                     "labels": ["pos", "neg"], "labelers_per_item": 3}).json()
    cid = camp["id"]
    ids = {it["data"]["text"]: it["id"] for it in srv.store.items(cid)}
    x = ["pos"] * 5 + ["neg"] * 5
    y = ["pos"] * 4 + ["neg"] + ["neg"] * 4 + ["pos"]
    for who, labels in (("l1", x), ("l2", y)):
        for t, lab in zip(texts, labels):
            r = _call(srv, k[who], "POST", f"{C}/{cid}/labels", json={"item_id": ids[t], "label": lab})
            assert r.status_code == 200, r.text
    assert _call(srv, k["l3"], "POST", f"{C}/{cid}/labels", json={"item_id": ids[texts[0]], "label": "pos"}).status_code == 200
    assert _call(srv, k["l3"], "POST", f"{C}/{cid}/labels", json={"item_id": ids[texts[1]], "skip": True}).status_code == 200
    r = _call(srv, k["l3"], "POST", f"{C}/{cid}/labels", json={"item_id": ids[texts[2]], "label": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "label"
    r = _call(srv, k["l3"], "POST", f"{C}/{cid}/labels", json={"item_id": ids[texts[2]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "label"

    view = _call(srv, k["l1"], "GET", f"{C}/{cid}").json()
    assert {x["name"] for x in view["progress"]["labelers"]} == {"l1", "l2", "l3"}
    names = {frozenset(p["names"]): p for p in view["agreement"]["pairs"]}  # pairs come in key-id order
    l12 = names[frozenset(("l1", "l2"))]
    assert l12["n"] == 10 and l12["kappa"] == pytest.approx(0.6) and l12["raw_agreement"] == pytest.approx(0.8)
    l13 = names[frozenset(("l1", "l3"))]
    assert l13["n"] == 1 and l13["kappa"] is None
    assert view["progress"]["skips"] == 1
    # /next for l3: the labelled and the skipped item are not offered again
    nxt = _call(srv, k["l3"], "GET", f"{C}/{cid}/next").json()
    assert nxt["item_id"] not in (ids[texts[0]], ids[texts[1]]) and nxt["labels"] == ["pos", "neg"]

    # export: majority label per item; l1 and l2 disagree on 2 items and l3 breaks the tie only on item 0
    exp = _call(srv, k["trainer"], "POST", f"{C}/{cid}/export", json={"validation": 0.0})
    assert exp.status_code == 200, exp.text
    e = exp.json()
    assert e["records"] == 8 and e["dropped"] == {"split vote": 2}
    ds = _call(srv, k["trainer"], "GET", f"/v1/tunelab/datasets/{e['dataset_id']}").json()
    assert ds["manifest"]["kinds"] == {"classification": 8}
    assert ds["manifest"]["lineage"]["campaign_id"] == cid and ds["source"] == {"kind": "feedback", "id": cid}


def test_bad_campaign_bodies(make_server):
    srv = make_server(worker=False)
    k = _keys(srv)
    cases = [
        ({"kind": "ab"}, "items"),
        ({"kind": "ab", "items": _ab_items(1), "prompts": ["x"], "models": ["a", "b"]}, "items"),
        ({"kind": "ab", "prompts": ["x"], "models": ["a", "a"]}, "models"),
        ({"kind": "ab", "prompts": ["x"]}, "models"),
        ({"kind": "ab", "prompts": [], "models": ["a", "b"]}, "prompts"),
        ({"kind": "ab", "items": [{"text": "t"}]}, "items.0"),
        ({"kind": "label", "items": [{"text": "t"}], "labels": ["x"]}, "labels"),
        ({"kind": "label", "items": [{"prompt": "p", "a": "1", "b": "2"}], "labels": ["x", "y"]}, "items.0"),
        ({"kind": "label", "items": [], "labels": ["x", "y"]}, "items"),
    ]
    for body, param in cases:
        r = _call(srv, k["trainer"], "POST", C, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "prompts": "file-" + "0" * 24, "models": ["a", "b"]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "prompts"
    r = _call(srv, k["trainer"], "POST", C, json={"kind": "poll"})
    assert r.status_code == 400 and "error" in r.json()
    assert _call(srv, k["trainer"], "GET", f"{C}/campaign-nope").status_code == 404
    cid = _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "items": _ab_items(2)}).json()["id"]
    r = _call(srv, k["trainer"], "POST", f"{C}/{cid}/export")
    assert r.status_code == 400 and r.json()["error"]["code"] == "nothing_to_export"
    assert _call(srv, k["l1"], "POST", f"{C}/{cid}/export").status_code == 403


def test_generated_ab_campaign_through_in_process_inference(make_server, tiny_model, tmp_path):
    """prompts (an uploaded file) + models [A, B]: outputs generated by the platform's own inference."""
    import shutil

    srv = make_server(worker=False)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    k = _keys(srv)
    prompts = tmp_path / "prompts.jsonl"
    # text records are prompts; so is the last user turn of a chat
    prompts.write_text("".join(json.dumps({"text": f"What color is the cat {i}?"}) + "\n" for i in range(3)))
    up = _call(srv, k["trainer"], "POST", "/v1/files", files={"file": ("prompts.jsonl", prompts.read_bytes())},
               data={"purpose": "tunelab-data"})
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a dog."},
                                              {"role": "assistant", "content": "Rex."}]}) + "\n")
    assert _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "prompts": _call(
        srv, k["trainer"], "POST", "/v1/files", files={"file": ("c.jsonl", chats.read_bytes())},
        data={"purpose": "fine-tune"}).json()["id"], "models": ["a", "b"]}).json()["prompt_source"]["prompts"] == 1
    up = _call(srv, k["trainer"], "POST", "/v1/files", files={"file": ("prompts.jsonl", prompts.read_bytes())},
               data={"purpose": "tunelab-data"})
    assert up.status_code == 200, up.text
    r = _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "prompts": up.json()["id"],
                                                  "models": [str(tiny_model), str(other)], "max_tokens": 8})
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    assert r.json()["status"] == "generating" and r.json()["prompt_source"]["prompts"] == 3
    deadline = time.time() + 120
    while time.time() < deadline:
        c = _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()
        if c["status"] != "generating":
            break
        time.sleep(0.2)
    assert c["status"] == "open", c
    assert c["items"] == 3 and c["prompt_source"]["file_id"] == up.json()["id"]
    items = srv.store.items(cid)
    assert [it["data"]["prompt"] for it in items] == [f"What color is the cat {i}?" for i in range(3)]
    assert all(isinstance(it["data"]["a"], str) and isinstance(it["data"]["b"], str) for it in items)
    nxt = _call(srv, k["l1"], "GET", f"{C}/{cid}/next").json()
    assert str(tiny_model) not in json.dumps(nxt) and "other-model" not in json.dumps(nxt)

    # a model that cannot be served: the campaign fails with the reason
    r = _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "prompts": ["hi"], "models": [str(tiny_model),
                                                                                              "no-such-model"]})
    cid = r.json()["id"]
    deadline = time.time() + 60
    while _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()["status"] == "generating" and time.time() < deadline:
        time.sleep(0.2)
    c = _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()
    assert c["status"] == "failed" and "no-such-model" in c["error"]
    assert _call(srv, k["l1"], "GET", f"{C}/{cid}/next").status_code == 409


def _export_ten_judgments(srv, k) -> tuple[str, dict]:
    """A labeler judges ten items (plus a tie; one item has identical outputs); the campaign is exported."""
    items = _ab_items(12)
    items[11]["b"] = items[11]["a"]  # identical outputs: dropped
    cid = _call(srv, k["trainer"], "POST", C, json={"kind": "ab", "name": "colors v1", "items": items,
                                                    "models": ["base", "tuned"]}).json()["id"]
    for _ in range(10):
        j = _call(srv, k["l1"], "GET", f"{C}/{cid}/next").json()
        choice = "left" if "red" in j["left"] else "right"
        r = _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": j["item_id"], "choice": choice})
        assert r.status_code == 200
    j = _call(srv, k["l1"], "GET", f"{C}/{cid}/next").json()
    _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": j["item_id"], "choice": "tie"})
    j = _call(srv, k["l1"], "GET", f"{C}/{cid}/next").json()
    _call(srv, k["l1"], "POST", f"{C}/{cid}/judgments", json={"item_id": j["item_id"], "choice": "left"})
    r = _call(srv, k["trainer"], "POST", f"{C}/{cid}/export", json={"validation": 0.1})
    assert r.status_code == 200, r.text
    return cid, r.json()


def _reward_recipe(model, train_file: str) -> dict:
    return {"recipe": "reward", "name": "fb", "model": {"name": str(model)},
            "data": {"train": train_file, "max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": {"max_steps": 2, "batch_size": 2}}


def test_export_is_a_dataset_version_with_lineage_that_a_reward_job_accepts(make_server, tiny_model):
    srv = make_server(worker=False)
    k = _keys(srv)
    cid, e = _export_ten_judgments(srv, k)
    assert e["records"] == 10 and e["dropped"] == {"tie": 1, "identical outputs": 1}
    ds_id = e["dataset_id"]
    assert ds_id.startswith("ds-feedback-colors-v1-")
    ds = _call(srv, k["trainer"], "GET", f"/v1/tunelab/datasets/{ds_id}").json()
    lin = ds["manifest"]["lineage"]
    assert lin["campaign_id"] == cid and lin["models"] == {"a": "base", "b": "tuned"}
    assert lin["prompt_source"]["kind"] == "inline items" and lin["records"] == 10
    assert "Upstream lineage" in ds["datacard"] and cid in ds["datacard"]
    assert ds["manifest"]["kinds"] == {"preference": 10} and ds["profile"] is not None
    recs = _call(srv, k["trainer"], "GET", f"/v1/tunelab/datasets/{ds_id}/records",
                 params={"split": "train", "limit": 100}).json()["data"]
    assert recs and all("red" in x["chosen"] and "know" in x["rejected"] for x in recs)
    assert _call(srv, k["trainer"], "GET", f"{C}/{cid}").json()["datasets"] == [ds_id]
    assert ds_id in [d["id"] for d in _call(srv, k["viewer"], "GET", "/v1/tunelab/datasets").json()["data"]]
    assert _call(srv, k["other"], "GET", f"/v1/tunelab/datasets/{ds_id}").status_code == 404
    # the same answers exported again: the same version (its id is its content), listed once
    again = _call(srv, k["trainer"], "POST", f"{C}/{cid}/export", json={"validation": 0.1}).json()
    assert again["dataset_id"] == ds_id and again["reused"] and again["files"] == e["files"]
    assert len(_call(srv, k["trainer"], "GET", "/v1/tunelab/datasets").json()["data"]) == 1

    recipe = _reward_recipe(tiny_model, e["files"]["train"])
    assert _call(srv, k["l1"], "POST", "/v1/tunelab/jobs", json={"recipe": recipe}).status_code == 403
    job = _call(srv, k["trainer"], "POST", "/v1/tunelab/jobs", json={"recipe": recipe})
    assert job.status_code == 200, job.text
    assert f"train: {srv.ws.root / 'datasets' / ds_id / 'train.jsonl'}" in job.json()["recipe"]
    dpo = {**recipe, "recipe": "dpo"}
    assert _call(srv, k["trainer"], "POST", "/v1/tunelab/jobs", json={"recipe": dpo}).status_code == 200


@pytest.mark.slow
def test_export_trains_a_reward_model_through_the_job_api(make_server, tiny_model):
    """Ten judgments → export → a reward job through POST /v1/tunelab/jobs that the worker runs to success
    (about 50 s on 2 cores: the job's process loads torch, transformers and trl)."""
    srv = make_server()
    k = _keys(srv)
    _, e = _export_ten_judgments(srv, k)
    job = _call(srv, k["trainer"], "POST", "/v1/tunelab/jobs", json={"recipe": _reward_recipe(tiny_model,
                                                                                              e["files"]["train"])})
    assert job.status_code == 200, job.text
    done = srv.wait(job.json()["id"], timeout=240)
    assert done["status"] == "succeeded", (done["error"], srv.ws.root.joinpath(
        "platform/jobs", done["id"], "log.txt").read_text()[-3000:])
    run = srv.ws.runs_dir / job.json()["run_id"]
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["dataset_id"] == e["dataset_id"]  # the run's lineage goes through the version to the campaign
    assert done["result"]["data"]["train_pairs"] + done["result"]["data"]["validation_pairs"] >= 9
