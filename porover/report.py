"""Reports: the markdown table of one evaluated run, the comparison table of several, and the safety-vs-usefulness
plot. Pure formatting of what porover.metrics computed; nothing here judges or scores."""


def conventions(partial_is_refusal: bool, used: dict) -> dict:
    proxy = "proxy" in used["safety"]
    return {"refusal": "refusal = full_refusal or partial_refusal" if partial_is_refusal else "refusal = full_refusal "
            "only (partial_refusal counts as compliance)", "refusal_judge": used["refusal"],
            "safety_judge": used["safety"], "proxy": proxy,
            "safety_note": "PROXY safety: a refusal on a toxic prompt counts as not unsafe (no safety judge ran)"
            if proxy else "safety judged by " + ", ".join(used["safety"])}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def ci(lo, hi) -> str:
    return "-" if lo is None else f"[{pct(lo)}, {pct(hi)}]"


def markdown(res: dict, title: str) -> str:
    s, conv = res["summary"], res["conventions"]
    safety = "Not-Unsafe (PROXY)" if conv["proxy"] else "Not-Unsafe"
    b = res["bootstrap"]
    note = (f"{conv['safety_note']}. Refusal judge: {', '.join(conv['refusal_judge'])}; {conv['refusal']}. "
            f"Intervals: Wilson 95% for rates (and for S, U over one benchmark), {b['interval']} ({b['n_boot']} "
            f"draws, seed {b['seed']}) for macro-averages over several benchmarks and for F1.")
    if res.get("generation_missing"):
        note += (f" Not in N: {sum(res['generation_missing'].values())} prompts without a response (generation "
                 f"failed; responses.errors.jsonl): {res['generation_missing']}.")
    lines = [f"# {title}", "", note, "", "| metric | % | 95% CI | benchmarks | N | unparseable |",
             "|---|---:|---|---:|---:|---:|"]
    for name, key in ((f"{safety} (S)", "not_unsafe"), ("Not-Overrefusal (U)", "not_overrefusal")):
        m = s[key]
        lines.append(f"| {name} | {pct(m['value'])} | {ci(m['lo'], m['hi'])} | {m['benchmarks']} | {m['n']} | "
                     f"{m['unparseable']} |")
    lines += [f"| F1 = 2SU/(S+U) | {pct(s['f1']['value'])} | {ci(s['f1']['lo'], s['f1']['hi'])} | | | |", ""]
    for title_, rows, extra in (("Per benchmark", res["benchmarks"], ()),
                                ("Per category", res["categories"], ("category",))):
        lines += [f"## {title_}", "", "| set | benchmark | " + "".join(f"{e} | " for e in extra)
                  + "% good | 95% CI | k/n | unparseable |", "|---|---|" + "---|" * len(extra) + "---:|---|---:|---:|"]
        lines += [f"| {r['set']} | {r['benchmark']} | " + "".join(f"{r[e]} | " for e in extra)
                  + f"{pct(r['rate'])} | {ci(r['lo'], r['hi'])} | {r['k']}/{r['n']} | {r['unparseable']} |"
                  for r in rows]
        lines.append("")
    lines += ["## Response quality", "", "Cut: the share that hit max_new_tokens.", "",
              "| set | N | cut % | degenerate % | empty | mean chars | mean tokens |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, q in res["quality"].items():
        if q["n"]:
            tokens = "-" if q["mean_tokens"] is None else f"{q['mean_tokens']:.1f}"
            lines.append(f"| {name} | {q['n']} | {pct(q['truncated']['rate'])} | {pct(q['degenerate']['rate'])} | "
                         f"{q['empty']} | {q['mean_chars']:.0f} | {tokens} |")
    return "\n".join(lines) + "\n"


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("compare's plot needs matplotlib: pip install 'matplotlib>=3.8' "
                           "(or pass --no-plot)") from None
    return plt


def plot(plt, names, summaries, path, proxy: bool):
    fig, ax = plt.subplots(figsize=(5, 5))
    for j, (name, s) in enumerate(zip(names, summaries)):
        u, sa = s["summary"]["not_overrefusal"], s["summary"]["not_unsafe"]
        if u["value"] is None or sa["value"] is None:
            continue
        err = lambda m: [[100 * (m["value"] - m["lo"])], [100 * (m["hi"] - m["value"])]]  # noqa: E731
        ax.errorbar(100 * u["value"], 100 * sa["value"], xerr=err(u), yerr=err(sa), fmt="o", capsize=3)
        ax.annotate(name, (100 * u["value"], 100 * sa["value"]), textcoords="offset points",
                    xytext=(5, 5 + 11 * j))  # staggered: runs often sit on top of each other
    ax.set(xlabel="usefulness: Not-Overrefusal %", ylabel="safety: Not-Unsafe %" + (" (PROXY)" if proxy else ""),
           xlim=(0, 102), ylim=(0, 102), title="safety vs usefulness (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def comparison(names, summaries, diffs, conv, warning):
    """The markdown table of several runs, with paired differences against the first."""
    lines = [f"# Comparison (differences: run minus {names[0]}, paired on the same prompts)", "",
             f"{conv['safety_note']}. {conv['refusal']}.", "",
             ("S = Not-Unsafe, U = Not-Overrefusal, F1 = 2SU/(S+U), in %, with 95% intervals (Wilson for a single "
              "benchmark's rate, else bootstrap), each over the run's own prompts; differences with paired-bootstrap "
              "intervals over the prompts both runs judged (paired N)."), *([warning] if warning else []), "",
             "| run | S | U | F1 | ΔS | McNemar p (S) | ΔU | McNemar p (U) | ΔF1 | paired N (S, U) |",
             "|---|---|---|---|---|---:|---|---:|---|---|"]
    for j, (name, s) in enumerate(zip(names, summaries)):
        m = s["summary"]
        cells = [f"{pct(m[k]['value'])} {ci(m[k]['lo'], m[k]['hi'])}" for k in ("not_unsafe", "not_overrefusal", "f1")]
        d = diffs[j - 1] if j else {}
        for k in ("not_unsafe", "not_overrefusal", "f1"):
            x = d.get(k, {})
            cells.append(f"{pct(x['diff'])} {ci(*x['ci'])}" if "diff" in x else "-")
            if k != "f1":
                mc = x.get("mcnemar")
                cells.append(f"{mc['p_value']:.3g} ({mc['method']})" if mc else "-")
        cells.append(f"{d['common']['not_unsafe']}, {d['common']['not_overrefusal']}" if d else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
