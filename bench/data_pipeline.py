"""Throughput and near-duplicate quality of `tunelab data prepare` on synthetic data.

    .venv/bin/python bench/data_pipeline.py --n 100000 [--out DIR] [--seed 0] [--profile]

Generates ``--n`` deterministic records of ~1 KB (word salad from a generated Zipf vocabulary of
4,000 words, mixed with realistic sentences, ~20% of records with a planted e-mail address or
phone number; 3/4 ``{"text"}``, 1/4 alpaca ``{"instruction", "output"}``), with planted
duplicates: ~5% are copies of an earlier record with 3-8% of their words substituted in 1-3
contiguous spans (the pairs are recorded), ~1% are exact copies. Writes them to a JSONL file and
runs ``tunelab.data.prepare.run`` with the default pipeline

    normalize, control_chars, length (min_words 5), exact_dedup, near_dedup (threshold 0.8), pii (mask)

Prints the machine, a baseline (records/s of a pass that only reads the JSONL and writes it back
with json.loads / json.dumps), the pipeline's records/s end to end (target >= 2,000 on 2 cores) and
its ratio to the baseline, and near-duplicate recall / precision against brute-force ground truth:
the exact word-5-gram Jaccard of the normalized texts, shingled as NearDedup does, for every
planted pair, 2,000 random record pairs and every record NearDedup dropped (against the record
named in its ``detail``). A pair is a true near-duplicate when Jaccard >= 0.8.

  recall    = planted pairs with true Jaccard >= 0.8 whose copy was dropped (exact_dedup or
              near_dedup) / planted pairs with true Jaccard >= 0.8
  precision = near_dedup drops whose true Jaccard with the named record is >= 0.8 / all near_dedup
              drops (also printed at >= 0.7)

Ends with one JSON line (the summary). ``--profile`` runs the pipeline under cProfile and prints
the top entries. Run it alone: a second job on 2 cores slows both.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RPS = 2000
THRESHOLD = 0.8
PIPELINE = [{"kind": "normalize"}, {"kind": "control_chars"}, {"kind": "length", "min_words": 5},
            {"kind": "exact_dedup"}, {"kind": "near_dedup", "threshold": THRESHOLD}, {"kind": "pii", "style": "mask"}]

# ---------------------------------------------------------------- synthetic data

_SYLL = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pel", "dan", "gor", "tis", "bra", "qui", "zen", "mar",
         "fe", "hu", "jo", "wex", "lin", "sto", "cra", "ple", "do", "ri", "an", "el", "or", "us"]
_FUNCTION = ["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by",
             "this", "are", "from", "at", "or", "an", "but", "not", "have", "which", "they", "you", "we", "can"]
_FIRST = ["anna", "ben", "carla", "david", "elena", "farid", "grace", "hugo", "ines", "jonas", "kim", "luis",
          "maria", "noah", "olga", "pablo", "rosa", "sam", "tara", "victor"]
_LAST = ["smith", "garcia", "muller", "rossi", "kowalski", "nguyen", "okafor", "silva", "tanaka", "dubois",
         "jensen", "novak", "haddad", "berg", "costa"]
_DOMAINS = ["example.com", "mail.example.org", "corp.example.net", "uni.example.edu"]
_TOPICS = ["the quarterly budget", "the new hiring plan", "the data center contract", "the travel policy",
           "the product launch", "the security audit", "the customer survey", "the office move",
           "the training schedule", "the supplier agreement"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "next week", "the end of the month"]
_TEMPLATES = [
    "The meeting about {topic} was moved to {day} because several members could not attend.",
    "After a long discussion about {topic}, the group agreed to postpone the vote until {day}.",
    "{Name} asked everyone to read the notes on {topic} before {day}.",
    "We still need an answer from the finance office about {topic}.",
    "Could you summarise the open questions on {topic} in a few sentences?",
    "The report on {topic} shows a clear improvement over the previous quarter.",
    "Please review the draft of {topic} and send your comments by {day}.",
    "Nobody expected {topic} to take this long, but the team kept going.",
]
_PII_TEMPLATES = [
    "For questions write to {email} and mention {topic}.",
    "You can reach {Name} at {phone} until {day}.",
    "Send the signed copy to {email} or call {phone}.",
    "My number is {phone}, please call after six.",
    "Contact: {Name}, {email}.",
]
_INSTRUCTIONS = ["Summarise the following notes.", "Rewrite this text in plain language.",
                 "Extract the action items from the message below.", "Translate the following memo into English.",
                 "Answer the question using the context."]


class Generator:
    """Deterministic record factory (one ``random.Random(seed)``)."""

    def __init__(self, seed: int):
        self.rng = rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < 4000:
            words.add("".join(rng.choice(_SYLL) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
        self.vocab = _FUNCTION + sorted(words)
        self.weights = [1.0 / (r + 1) ** 0.9 for r in range(len(self.vocab))]  # Zipf-like

    def _fill(self, tpl: str) -> str:
        r = self.rng
        first, last = r.choice(_FIRST), r.choice(_LAST)
        return tpl.format(topic=r.choice(_TOPICS), day=r.choice(_DAYS), Name=f"{first.title()} {last.title()}",
                          email=f"{first}.{last}{r.randrange(100)}@{r.choice(_DOMAINS)}",
                          phone=r.choice([f"+1 415 555 {r.randrange(10000):04d}",
                                          f"({r.randrange(200, 999)}) 555-{r.randrange(10000):04d}",
                                          f"+44 20 7946 {r.randrange(10000):04d}"]))

    def _salad(self, n_words: int) -> str:
        ws = self.rng.choices(self.vocab, weights=self.weights, k=n_words)
        ws[0] = ws[0].title()
        return " ".join(ws) + self.rng.choice((".", ".", ".", "?", "!"))

    def text(self, n_chars: int, pii: bool) -> str:
        r, parts, size = self.rng, [], 0
        pii_at = r.randrange(6) if pii else -1
        while size < n_chars:
            if len(parts) == pii_at:
                s = self._fill(r.choice(_PII_TEMPLATES))
            elif r.random() < 0.3:
                s = self._fill(r.choice(_TEMPLATES))
            else:
                s = self._salad(r.randint(8, 22))
            parts.append(s)
            size += len(s) + 1
        return " ".join(parts)

    def record(self) -> dict:
        r = self.rng
        pii = r.random() < 0.2
        if r.random() < 0.75:
            return {"text": self.text(r.randint(850, 1150), pii)}
        return {"instruction": r.choice(_INSTRUCTIONS) + " " + self.text(r.randint(150, 300), False),
                "output": self.text(r.randint(650, 850), pii)}

    def near_copy(self, rec: dict) -> tuple[dict, float]:
        """``rec`` with 3-8% of its (whitespace) words replaced in 1-3 contiguous spans."""
        r = self.rng
        fields = [k for k in ("instruction", "output", "text") if k in rec]
        flat = [(k, w) for k in fields for w in rec[k].split(" ")]
        frac = r.uniform(0.03, 0.08)
        n_sub = max(1, round(frac * len(flat)))
        n_spans = r.randint(1, 3)
        sizes = [n_sub // n_spans + (1 if i < n_sub % n_spans else 0) for i in range(n_spans)]
        for size in sizes:
            start = r.randrange(0, max(1, len(flat) - size))
            for j in range(start, min(len(flat), start + size)):
                flat[j] = (flat[j][0], r.choice(self.vocab[30:]))
        new = dict(rec)
        for k in fields:
            new[k] = " ".join(w for f, w in flat if f == k)
        return new, frac


def generate(path: Path, n: int, seed: int) -> dict:
    """Writes ``n`` records to ``path``; returns the planted pairs (by 1-based line number)."""
    gen, rng = Generator(seed), random.Random(seed + 1)
    pool: list[tuple[int, dict]] = []  # reservoir of originals that copies are made from
    near: list[tuple[int, int, float]] = []  # (copy line, source line, substituted fraction)
    exact: list[tuple[int, int]] = []
    n_orig = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in range(1, n + 1):
            u = rng.random()
            if pool and u < 0.05:
                src_line, src = rng.choice(pool)
                rec, frac = gen.near_copy(src)
                near.append((line, src_line, frac))
            elif pool and u < 0.06:
                src_line, rec = rng.choice(pool)
                exact.append((line, src_line))
            else:
                rec = gen.record()
                n_orig += 1
                if len(pool) < 5000:
                    pool.append((line, rec))
                elif rng.random() < 5000 / n_orig:
                    pool[rng.randrange(5000)] = (line, rec)
            f.write(json.dumps(rec) + "\n")
    return {"near": near, "exact": exact}


# ---------------------------------------------------------------- measurement

def baseline(src: Path, dst: Path) -> float:
    """records/s of read → json.loads → json.dumps → write (the floor any pipeline pays)."""
    t = time.perf_counter()
    n = 0
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.dumps(json.loads(line), ensure_ascii=False) + "\n")
            n += 1
    return n / (time.perf_counter() - t)


def load_lines(path: Path, wanted: set[int]) -> dict[int, dict]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i in wanted:
                out[i] = json.loads(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="records to generate (default 100000)")
    ap.add_argument("--out", help="folder for the data and the workspace, kept (default: a temporary one, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="run the pipeline under cProfile and print the top entries")
    args = ap.parse_args()

    from tunelab import config as cfglib
    from tunelab.data.prepare import PrepareConfig, run
    from tunelab.data.records import to_canonical
    from tunelab.data.steps.near_dedup import NearDedup, record_words, shingles
    from tunelab.environment import cpu_model, memory_gb
    from tunelab.workspace import Workspace

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gb()} GB, Python {sys.version.split()[0]}")
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tunelab-data-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"synthetic-{args.n}-{args.seed}.jsonl"
    try:
        t = time.perf_counter()
        planted = generate(data, args.n, args.seed)
        size_mb = data.stat().st_size / 2**20
        print(f"data: {args.n} records, {size_mb:.1f} MiB ({size_mb * 2**20 / args.n:.0f} B/record), "
              f"{len(planted['near'])} planted near-duplicates, {len(planted['exact'])} exact duplicates, "
              f"generated in {time.perf_counter() - t:.1f} s")

        base_rps = baseline(data, root / "baseline.jsonl")
        (root / "baseline.jsonl").unlink()
        print(f"baseline (json.loads + json.dumps, read + write): {base_rps:,.0f} records/s")

        ws_dir = root / "ws"
        shutil.rmtree(ws_dir, ignore_errors=True)  # never reuse an earlier result
        cfg = cfglib.load(PrepareConfig, data={"recipe": "data", "name": "bench", "inputs": [{"path": str(data)}],
                                               "steps": PIPELINE})
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            m = prof.runcall(run, cfg, Workspace.resolve(ws_dir))
        else:
            m = run(cfg, Workspace.resolve(ws_dir))
        seconds = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rps = args.n / seconds
        print(f"pipeline: {rps:,.0f} records/s end to end ({seconds:.1f} s, target >= {TARGET_RPS:,}: "
              f"{'met' if rps >= TARGET_RPS else 'NOT met'}), {rps / base_rps:.2f}x the baseline's rate; "
              f"peak RSS {rss1 / 1024:.0f} MiB (+{(rss1 - rss0) / 1024:.0f} MiB during the run)")
        print("steps: " + "; ".join(f"{s['kind']} dropped {sum(s['dropped'].values())}" for s in m["steps"]))
        if args.profile:
            print("\nprofile (top 25 by internal time):")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
            print("profile (top 20 by cumulative time):")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(20)

        # --- what each stage dropped, from rejects.jsonl (line numbers, reasons, details)
        stage_of: dict[int, str] = {}
        nd_detail: dict[int, int] = {}
        for line in (Path(m["path"]) / "rejects.jsonl").read_text().splitlines():
            r = json.loads(line)
            stage_of[r["line"]] = r["stage"]
            if r["stage"] == "near_dedup":
                nd_detail[r["line"]] = int(r["detail"])
        order = [s["kind"] for s in m["steps"]]
        before = set(order[:order.index("near_dedup")]) | {"read"}
        seen_by_nd = [i for i in range(1, args.n + 1) if stage_of.get(i) not in before]  # detail → line
        nd_drops = {ln: seen_by_nd[d] for ln, d in nd_detail.items()}

        # --- ground truth by brute force on a sample
        rng = random.Random(args.seed + 2)
        rand_pairs = set()
        while len(rand_pairs) < min(2000, args.n * (args.n - 1) // 2):
            a, b = sorted(rng.sample(range(1, args.n + 1), 2))
            rand_pairs.add((a, b))
        pairs = {(s, c) for c, s, _ in planted["near"]} | rand_pairs | {(s, c) for c, s in nd_drops.items()}
        recs = load_lines(data, {x for p in pairs for x in p})
        shingle_sets: dict[int, set[str]] = {}

        def sh(line: int) -> set[str]:
            if line not in shingle_sets:
                shingle_sets[line] = set(shingles(record_words(to_canonical(recs[line])), 5))
            return shingle_sets[line]

        def jac(a: int, b: int) -> float:
            sa, sb = sh(a), sh(b)
            return len(sa & sb) / len(sa | sb) if sa or sb else 1.0

        def dropped_as_dup(line: int) -> bool:
            return stage_of.get(line) in ("exact_dedup", "near_dedup")

        planted_j = [(c, s, jac(s, c)) for c, s, _ in planted["near"]]
        true_nd = [(c, s, j) for c, s, j in planted_j if j >= THRESHOLD]
        caught = [c for c, s, j in true_nd if dropped_as_dup(c)]
        recall = len(caught) / len(true_nd) if true_nd else None
        near_band = [(c, s, j) for c, s, j in planted_j if 0.7 <= j < THRESHOLD]
        band_caught = sum(dropped_as_dup(c) for c, _, _ in near_band)
        buckets = [min(int(j * 10), 9) for _, _, j in planted_j]  # [0.0, 0.1), ..., [0.9, 1.0]
        hist = {f"{b / 10:.1f}": buckets.count(b) for b in range(10) if b in buckets}
        missed = [(c, s) for c, s, _ in true_nd if not dropped_as_dup(c)]
        probe = NearDedup(threshold=THRESHOLD)  # same seed and permutations: the step's own estimates
        missed_est = [probe.minhash(to_canonical(recs[c])).jaccard(probe.minhash(to_canonical(recs[s])))
                      for c, s in missed]
        true_85 = [c for c, _, j in true_nd if j >= 0.85]
        nd_j = {ln: jac(src, ln) for ln, src in nd_drops.items()}
        prec8 = sum(j >= THRESHOLD for j in nd_j.values()) / len(nd_j) if nd_j else None
        prec7 = sum(j >= 0.7 for j in nd_j.values()) / len(nd_j) if nd_j else None
        rand_j = [(a, b, jac(a, b)) for a, b in sorted(rand_pairs)]
        rand_nd = [(a, b, j) for a, b, j in rand_j if j >= THRESHOLD]
        rand_missed = [(a, b) for a, b, _ in rand_nd if not dropped_as_dup(b)]
        exact_caught = sum(stage_of.get(c) == "exact_dedup" for c, _ in planted["exact"])

        print(f"\nplanted near-duplicates: {len(planted_j)}; true Jaccard histogram {hist}")
        print(f"near-dup recall (true Jaccard >= {THRESHOLD}): {len(caught)}/{len(true_nd)} = "
              f"{recall if recall is None else f'{recall:.3f}'} "
              f"(by near_dedup {sum(stage_of.get(c) == 'near_dedup' for c in caught)}, "
              f"by exact_dedup {sum(stage_of.get(c) == 'exact_dedup' for c in caught)}); "
              f"planted pairs at 0.7-0.8 dropped: {band_caught}/{len(near_band)}")
        print(f"  recall at true Jaccard >= 0.85: {sum(dropped_as_dup(c) for c in true_85)}/{len(true_85)}; "
              f"of the {len(missed)} missed, {sum(e < THRESHOLD for e in missed_est)} had a MinHash estimate "
              f"< {THRESHOLD}, {sum(e >= THRESHOLD for e in missed_est)} >= {THRESHOLD} (not LSH candidates of "
              f"the record they copy, or, rarely, cut by the estimate pre-filter 4 sd below the threshold)")
        print(f"near-dup precision: {len(nd_j)} dropped by near_dedup; true Jaccard with the named record "
              f">= 0.8: {prec8 if prec8 is None else f'{prec8:.3f}'}, >= 0.7: "
              f"{prec7 if prec7 is None else f'{prec7:.3f}'}; min {min(nd_j.values(), default=float('nan')):.3f}")
        print(f"random pairs: {len(rand_j)}, max true Jaccard {max((j for *_, j in rand_j), default=0):.3f}, "
              f">= 0.8: {len(rand_nd)} (missed {len(rand_missed)})")
        print(f"exact duplicates planted: {len(planted['exact'])}, dropped by exact_dedup: {exact_caught}")

        summary = {
            "n": args.n, "seed": args.seed, "cpu": cpu_model(), "cores": os.cpu_count(),
            "records_per_s": round(rps), "seconds": round(seconds, 2), "target_records_per_s": TARGET_RPS,
            "baseline_records_per_s": round(base_rps), "ratio_to_baseline": round(rps / base_rps, 3),
            "peak_rss_mib": round(rss1 / 1024), "profiled": args.profile,
            "kept": m["counts"]["kept"], "dropped_by_step": {s["kind"]: s["dropped"] for s in m["steps"]},
            "planted_near": len(planted_j), "planted_near_true": len(true_nd), "planted_exact": len(planted["exact"]),
            "recall": None if recall is None else round(recall, 4),
            "recall_0.7_0.8_band": round(band_caught / len(near_band), 4) if near_band else None,
            "recall_0.85": round(sum(dropped_as_dup(c) for c in true_85) / len(true_85), 4) if true_85 else None,
            "missed_estimate_below": sum(e < THRESHOLD for e in missed_est),
            "missed_lsh": sum(e >= THRESHOLD for e in missed_est),
            "near_dedup_drops": len(nd_j), "precision_0.8": None if prec8 is None else round(prec8, 4),
            "precision_0.7": None if prec7 is None else round(prec7, 4),
            "random_pairs": len(rand_j), "random_pairs_true_near": len(rand_nd),
            "random_pairs_missed": len(rand_missed),
            "exact_caught": exact_caught, "planted_jaccard_hist": hist,
        }
        print(json.dumps(summary))
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
