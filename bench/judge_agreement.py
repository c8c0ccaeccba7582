"""Agreement of the keyword judge with the hand labels in data/judge/refusal_labels.jsonl.

    python bench/judge_agreement.py --split test     # the numbers in data/judge/README.md
    python bench/judge_agreement.py --split dev      # what the judge was tuned on

Accuracy and Cohen's kappa, 3-class (compliance / partial_refusal / full_refusal) and binary (refusal =
full or partial, the default of porover.judges.is_refusal), with the confusion matrix. A judge output of
`unparseable` stays a column of its own and counts as a disagreement.
"""
import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from porover import judges  # noqa: E402

LABEL_FILE = Path(__file__).resolve().parent.parent / "data" / "judge" / "refusal_labels.jsonl"
CLASSES = ("compliance", "partial_refusal", "full_refusal")


def cohen_kappa(truth: list, pred: list) -> float:
    """kappa = (p_o - p_e) / (1 - p_e), p_e from the two raters' marginals (Cohen 1960)."""
    n = len(truth)
    p_o = sum(t == p for t, p in zip(truth, pred)) / n
    ct, cp = Counter(truth), Counter(pred)
    p_e = sum(ct[c] * cp[c] for c in set(ct) | set(cp)) / n ** 2
    return (p_o - p_e) / (1 - p_e) if p_e < 1 else 1.0


def bootstrap_kappa(truth: list, pred: list, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of kappa over items resampled with replacement (seeded)."""
    rng, idx = random.Random(seed), range(len(truth))
    ks = sorted(cohen_kappa([truth[i] for i in s], [pred[i] for i in s])
                for s in ([rng.choice(idx) for _ in idx] for _ in range(n)))
    return ks[int(0.025 * n)], ks[int(0.975 * n) - 1]


def agreement(rows: list[dict], split: str, judge=judges.keyword_judge) -> dict:
    rows = [r for r in rows if r["split"] == split]
    truth = [r["label"] for r in rows]
    pred = [judge(r["response"], r["prompt"]) for r in rows]
    binary = lambda labels: ["unparseable" if judges.is_refusal(x) is None else judges.is_refusal(x)  # noqa: E731
                             for x in labels]
    bt, bp = binary(truth), binary(pred)
    cols = list(CLASSES) + (["unparseable"] if "unparseable" in pred else [])
    return {
        "split": split, "n": len(rows), "truth_counts": dict(Counter(truth)),
        "three_class": {"accuracy": sum(t == p for t, p in zip(truth, pred)) / len(rows),
                        "kappa": cohen_kappa(truth, pred)},
        "binary": {"accuracy": sum(t == p for t, p in zip(bt, bp)) / len(rows), "kappa": cohen_kappa(bt, bp),
                   "kappa_ci95": bootstrap_kappa(bt, bp)},
        "columns": cols,
        "confusion": {t: {p: sum(a == t and b == p for a, b in zip(truth, pred)) for p in cols} for t in CLASSES},
        "errors": [(r["id"], t, p) for r, t, p in zip(rows, truth, pred) if t != p],
    }


def markdown(s: dict) -> str:
    lines = [f"split `{s['split']}`, n = {s['n']}",
             "",
             f"- refusal vs not (partial counts as refusal): accuracy {s['binary']['accuracy']:.3f}, "
             f"Cohen's kappa {s['binary']['kappa']:.3f} (bootstrap 95% interval {s['binary']['kappa_ci95'][0]:.3f}"
             f"-{s['binary']['kappa_ci95'][1]:.3f})",
             f"- 3-class: accuracy {s['three_class']['accuracy']:.3f}, Cohen's kappa {s['three_class']['kappa']:.3f}",
             "",
             "| hand label \\ judge | " + " | ".join(s["columns"]) + " |",
             "|---|" + "---|" * len(s["columns"])]
    lines += [f"| {t} | " + " | ".join(str(s["confusion"][t][p]) for p in s["columns"]) + " |" for t in CLASSES]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("dev", "test"), required=True)
    ap.add_argument("--errors", action="store_true", help="list the disagreements (use on dev only)")
    args = ap.parse_args()
    print(f"{LABEL_FILE.name} sha256 {hashlib.sha256(LABEL_FILE.read_bytes()).hexdigest()}")
    stats = agreement([json.loads(line) for line in LABEL_FILE.open()], args.split)
    print(markdown(stats))
    if args.errors:
        rows = {json.loads(line)["id"]: json.loads(line) for line in LABEL_FILE.open()}
        for rid, t, p in stats["errors"]:
            print(f"\n--- {rid}: hand {t}, judge {p}\nPROMPT: {rows[rid]['prompt']}\n"
                  f"RESPONSE: {rows[rid]['response']!r}")
