"""The Bedrock facade, driven by boto3's own `bedrock` client with a bearer token (a tunelab API key)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_color_data

boto3 = pytest.importorskip("boto3")


def self_signed(d) -> tuple[str, str]:
    """A certificate for 127.0.0.1 made here with openssl (boto3 sends a bearer token only over HTTPS)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture
def bedrock(make_server, monkeypatch, tmp_path):
    from botocore.config import Config

    from tunelab.platform.auth import create_key

    cert, key_file = self_signed(tmp_path)
    srv = make_server(tls=(cert, key_file))
    _, key = create_key(srv.store, "trainer", "team")
    _, viewer = create_key(srv.store, "viewer", "team")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", key)

    def client():
        return boto3.client("bedrock", endpoint_url=srv.url, region_name="us-east-1", verify=cert,
                            config=Config(retries={"max_attempts": 1}))

    return srv, client, viewer


def _prompt_completion(path, n):
    src = write_color_data(path.with_suffix(".src.jsonl"), n, seed=9)
    with open(path, "w") as f:
        for line in src.read_text().splitlines():
            r = json.loads(line)
            f.write(json.dumps({"prompt": r["instruction"], "completion": r["output"]}) + "\n")
    return path


def test_fine_tuning_job_through_boto3(bedrock, tiny_model, tmp_path, monkeypatch):
    srv, client, viewer = bedrock
    bd = client()
    train = _prompt_completion(tmp_path / "train.jsonl", 24)
    out = tmp_path / "out"
    arn = bd.create_model_customization_job(
        jobName="colors-1", customModelName="colors", roleArn="arn:aws:iam::000000000000:role/unused",
        baseModelIdentifier=str(tiny_model), customizationType="FINE_TUNING",
        trainingDataConfig={"s3Uri": train.as_uri()}, outputDataConfig={"s3Uri": out.as_uri()},
        hyperParameters={"epochCount": "1", "batchSize": "4", "learningRate": "0.001"})["jobArn"]
    assert arn.endswith(arn.rsplit("/", 1)[-1]) and ":model-customization-job/" in arn
    job = srv.wait(arn.rsplit("/", 1)[-1], timeout=180)
    assert job["status"] == "succeeded", job["error"]

    got = bd.get_model_customization_job(jobIdentifier=arn)
    assert got["status"] == "Completed" and got["jobName"] == "colors-1"
    assert got["statusDetails"]["trainingDetails"]["status"] == "Completed"
    assert got["trainingMetrics"]["trainingLoss"] > 0
    assert got["hyperParameters"] == {"epochCount": "1", "batchSize": "4", "learningRate": "0.001"}
    assert bd.get_model_customization_job(jobIdentifier="colors-1")["jobArn"] == arn  # by name too
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "summary.json").is_file()

    listed = bd.list_model_customization_jobs()["modelCustomizationJobSummaries"]
    assert [j["jobArn"] for j in listed] == [arn] and listed[0]["status"] == "Completed"
    assert bd.list_model_customization_jobs(statusEquals="InProgress")["modelCustomizationJobSummaries"] == []

    err = bd.exceptions
    with pytest.raises(err.ValidationException, match="already Completed|only a job in progress"):
        bd.stop_model_customization_job(jobIdentifier=arn)
    with pytest.raises(err.ResourceNotFoundException):
        bd.get_model_customization_job(jobIdentifier="nope")
    with pytest.raises(err.ValidationException, match="epochs"):
        bd.create_model_customization_job(
            jobName="bad", customModelName="c", roleArn="r", baseModelIdentifier=str(tiny_model),
            trainingDataConfig={"s3Uri": train.as_uri()}, outputDataConfig={"s3Uri": out.as_uri()},
            hyperParameters={"epochCount": "-1"})
    with pytest.raises(err.ValidationException, match="not reachable from this server"):
        bd.create_model_customization_job(
            jobName="s3", customModelName="c", roleArn="r", baseModelIdentifier=str(tiny_model),
            trainingDataConfig={"s3Uri": "s3://bucket/train.jsonl"}, outputDataConfig={"s3Uri": out.as_uri()})
    with pytest.raises(err.ValidationException, match="unknown"):
        bd.create_model_customization_job(
            jobName="hp", customModelName="c", roleArn="r", baseModelIdentifier=str(tiny_model),
            trainingDataConfig={"s3Uri": train.as_uri()}, outputDataConfig={"s3Uri": out.as_uri()},
            hyperParameters={"dropout": "0.1"})
    with pytest.raises(err.ConflictException):
        bd.create_model_customization_job(
            jobName="colors-1", customModelName="c", roleArn="r", baseModelIdentifier=str(tiny_model),
            trainingDataConfig={"s3Uri": train.as_uri()}, outputDataConfig={"s3Uri": out.as_uri()})

    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", viewer)  # read-only key
    ro = client()
    assert ro.get_model_customization_job(jobIdentifier=arn)["status"] == "Completed"
    with pytest.raises(ro.exceptions.AccessDeniedException):
        ro.stop_model_customization_job(jobIdentifier=arn)
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "tlk-000000000000-" + "x" * 43)
    with pytest.raises(client().exceptions.AccessDeniedException):
        client().list_model_customization_jobs()


def test_cpt_and_distillation_map_to_recipes_and_stop(bedrock, tiny_model, tmp_path):
    srv, client, _ = bedrock
    srv.worker.stop(kill=True)  # keep them queued: this checks the mapping and stopping a queued job
    bd = client()
    text = tmp_path / "corpus.jsonl"
    text.write_text("\n".join(json.dumps({"input": f"The {a} cat is red. " * 5}) for a in range(20)) + "\n")
    cpt = bd.create_model_customization_job(
        jobName="cpt-1", customModelName="legal", roleArn="r", baseModelIdentifier=str(tiny_model),
        customizationType="CONTINUED_PRE_TRAINING", trainingDataConfig={"s3Uri": text.as_uri()},
        outputDataConfig={"s3Uri": (tmp_path / "o1").as_uri()},
        hyperParameters={"maxSteps": "10", "learningRateWarmupSteps": "2"})["jobArn"]
    train = _prompt_completion(tmp_path / "t.jsonl", 10)
    dis = bd.create_model_customization_job(
        jobName="distill-1", customModelName="small", roleArn="r", baseModelIdentifier=str(tiny_model),
        customizationType="DISTILLATION", trainingDataConfig={"s3Uri": str(train)},
        outputDataConfig={"s3Uri": (tmp_path / "o2").as_uri()},
        customizationConfig={"distillationConfig": {"teacherModelConfig": {
            "teacherModelIdentifier": str(tiny_model)}}})["jobArn"]
    import yaml

    recipes = {j["spec"]["jobName"]: yaml.safe_load(j["recipe_yaml"]) for j in srv.store.list_jobs("team")}
    assert recipes["cpt-1"]["recipe"] == "cpt" and recipes["cpt-1"]["train"]["warmup_ratio"] == 0.2
    assert recipes["distill-1"]["recipe"] == "distill"
    assert recipes["distill-1"]["teacher"]["name"] == str(tiny_model)
    assert bd.get_model_customization_job(jobIdentifier=cpt)["status"] == "InProgress"
    bd.stop_model_customization_job(jobIdentifier=dis)
    assert bd.get_model_customization_job(jobIdentifier=dis)["status"] == "Stopped"
    with pytest.raises(bd.exceptions.ValidationException, match="teacherModelConfig"):
        bd.create_model_customization_job(
            jobName="distill-2", customModelName="small", roleArn="r", baseModelIdentifier=str(tiny_model),
            customizationType="DISTILLATION", trainingDataConfig={"s3Uri": str(train)},
            outputDataConfig={"s3Uri": (tmp_path / "o2").as_uri()})
