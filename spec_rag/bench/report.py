"""Markdown tables and plots from the JSON lines a run wrote (regenerated after every run).

``results.md``: accuracy per task and method@budget with the average over tasks, the average
by method and budget (and, when cells hold different samples, the same on the samples they all
hold), what each method cost, and the speed table with ratios against ``full``.
Plots (matplotlib's Agg canvas; no display and no global backend switch): accuracy vs budget,
latency vs prompt length, peak memory and KV cache vs prompt length.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import mean
from typing import Any

from spec_rag import SpecPCConfig
from spec_rag.bench.methods import METHOD_NAMES, SPECPC_SHAPED
from spec_rag.bench.records import SAMPLES_FILE, SPEED_FILE, read_jsonl

REPORT_FILE = "results.md"
ACCURACY_PLOT = "accuracy_vs_budget.png"
LATENCY_PLOT = "latency_vs_length.png"
MEMORY_PLOT = "memory_vs_length.png"
_MIB = 2**20


def _label(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method}@{budget}"


def _method_order(method: str) -> int:
    """Harness order; a variant (``specpc-k16``) right after its method."""
    if method in METHOD_NAMES:
        return 2 * METHOD_NAMES.index(method)
    base = method.rpartition("-k")[0]
    return 2 * METHOD_NAMES.index(base) + 1 if base in METHOD_NAMES else 2 * len(METHOD_NAMES)


def _labelled(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` with SpecPC-shaped rows that ran another pool width or neighbourhood than the
    default renamed (``specpc-k16``; ``specpc-k16n32`` when the two differ), so runs with several
    widths never share a cell."""
    default = SpecPCConfig()
    out = []
    for r in records:
        stats = r.get("stats") or {}
        kernel = stats.get("kernel_size", default.kernel_size)
        neighbors = stats.get("neighbor_tokens", default.neighbor_tokens)
        if r.get("method") in SPECPC_SHAPED and (kernel, neighbors) != (
            default.kernel_size,
            default.neighbor_tokens,
        ):
            suffix = f"k{kernel}" if kernel == neighbors else f"k{kernel}n{neighbors}"
            r = {**r, "method": f"{r['method']}-{suffix}"}
        out.append(r)
    return out


def _columns(records: Iterable[dict[str, Any]]) -> list[tuple[str, int | None]]:
    found = {(r["method"], r["budget"]) for r in records}
    return sorted(found, key=lambda c: (_method_order(c[0]), c[0], c[1] or 0))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append(
        "|" + "|".join(["---" if align_first_left and i == 0 else "---:" for i in range(len(header))]) + "|"
    )
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _groups(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str | None, int], list[dict[str, Any]]]:
    """Records by (target, draft, length); the draft is the one the draft methods used."""
    drafts: dict[tuple[str, int], str | None] = {}
    for r in records:
        if r.get("draft"):
            drafts[(r["target"], r["length"])] = r["draft"]
    groups: dict[tuple[str, str | None, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["target"], drafts.get((r["target"], r["length"])), r["length"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2])))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# -- accuracy -----------------------------------------------------------------------------------
DRAFT_ALONE = "draft-alone"


def _with_draft_alone(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` plus one ``draft-alone`` row per sample whose SpecKV rows recorded the draft's
    lookahead: the draft's own greedy answer, scored as the target's answers are. SpecKV keeps
    what that answer attends to, so this column shows how much the draft already knows."""
    extra: dict[str, dict[str, Any]] = {}
    for r in records:
        stats = r.get("stats") or {}
        if stats.get("lookahead_score") is None or r["sample_id"] in extra:
            continue
        extra[r["sample_id"]] = {
            **{k: r[k] for k in ("sample_id", "task", "length", "index", "target", "draft")},
            "method": DRAFT_ALONE,
            "budget": None,
            "answer": stats.get("lookahead", ""),
            "score": stats["lookahead_score"],
            "stats": {
                "prompt_tokens": stats.get("prompt_tokens", 0),
                "draft_s": stats.get("draft_s", 0.0),
                "total_s": stats.get("draft_s", 0.0),
            },
        }
    return [*records, *extra.values()]


@dataclass
class _Cells:
    """One (target, draft, length) group's accuracy records, prepared once for tables and plots."""

    target: str
    draft: str | None
    length: int
    records: list[dict[str, Any]]
    scores: dict[tuple[str, str, int | None], list[float]] = field(init=False)
    tasks: list[str] = field(init=False)
    columns: list[tuple[str, int | None]] = field(init=False)

    def __post_init__(self) -> None:
        self.scores = defaultdict(list)
        for r in self.records:
            self.scores[(r["task"], r["method"], r["budget"])].append(float(r["score"]))
        self.tasks = sorted({r["task"] for r in self.records})
        self.columns = _columns(self.records)

    @property
    def sample_count(self) -> int:
        return len({r["sample_id"] for r in self.records})

    def average(self, column: tuple[str, int | None]) -> float | None:
        """Macro average over tasks (each task's mean counts once)."""
        means = [100 * mean(self.scores[(t, *column)]) for t in self.tasks if self.scores.get((t, *column))]
        return mean(means) if means else None

    @cached_property
    def matched(self) -> _Cells | None:
        """The same cells on only the samples that every method and budget answered, when some
        cells hold fewer samples than others (a partial run): averages over different samples
        are not comparable, these are. ``None`` when every cell holds the same samples, or when
        no sample is common to all."""
        answered: dict[tuple[str, int | None], set[str]] = defaultdict(set)
        for r in self.records:
            if r["method"] != DRAFT_ALONE:  # derived from SpecKV's rows, not run on its own
                answered[(r["method"], r["budget"])].add(r["sample_id"])
        common = set.intersection(*answered.values()) if answered else set()
        if not common or all(ids == common for ids in answered.values()):
            return None
        kept = [r for r in self.records if r["sample_id"] in common]
        return _Cells(self.target, self.draft, self.length, kept)

    def by_budget(self) -> tuple[list[int], list[list[str]]]:
        """Budgets, and per method its task-averaged score at each."""
        budgets = sorted({b for _, b in self.columns if b is not None})
        rows = []
        for m in dict.fromkeys(m for m, _ in self.columns):
            if (m, None) in self.columns:  # full and draft-alone do not depend on the budget
                rows.append([m] + [_fmt(self.average((m, None)))] * len(budgets))
            else:
                rows.append([m] + [_fmt(self.average((m, b))) for b in budgets])
        return budgets, rows


def _accuracy_cells(records: Sequence[dict[str, Any]]) -> list[_Cells]:
    return [
        _Cells(target, draft, length, _with_draft_alone(group))
        for (target, draft, length), group in _groups(records).items()
    ]


def accuracy_markdown(groups: Sequence[_Cells]) -> str:
    parts = []
    for cells in groups:
        scores, tasks, columns, length = cells.scores, cells.tasks, cells.columns, cells.length
        samples = max(len(v) for v in scores.values())
        parts.append(
            f"### Accuracy at {length} tokens: target `{cells.target}`"
            + (f", draft `{cells.draft}`" if cells.draft else "")
            + f" (score x100, RULER string match, up to {samples} samples per cell)\n"
        )
        rows = [
            [t] + [_fmt(100 * mean(scores[(t, *c)])) if scores.get((t, *c)) else "–" for c in columns]
            for t in tasks
        ]
        rows.append(["**average**"] + [f"**{_fmt(cells.average(c))}**" for c in columns])
        parts.append(_table(["task", *(_label(*c) for c in columns)], rows) + "\n")

        note = ""
        if (DRAFT_ALONE, None) in columns:
            note = "; `draft-alone`: the draft's own answer, SpecKV's lookahead"
        budgets, by_method = cells.by_budget()
        parts.append(f"Average over tasks by budget ({length} tokens; `full` keeps everything{note}):\n")
        parts.append(_table(["method", *(str(b) for b in budgets)], by_method) + "\n")
        matched = cells.matched
        if matched is not None:
            budgets, by_method = matched.by_budget()
            parts.append(
                "The cells above hold different samples (a partial run). The same averages on only the "
                f"{matched.sample_count} samples that every method and budget answered "
                f"({len(matched.tasks)} of {len(tasks)} tasks):\n"
            )
            parts.append(_table(["method", *(str(b) for b in budgets)], by_method) + "\n")

        cost_rows = []
        for c in columns:
            rs = [r for r in cells.records if (r["method"], r["budget"]) == c]
            stats = [r["stats"] for r in rs]
            cost_rows.append(
                [
                    _label(*c),
                    str(len(rs)),
                    _fmt(mean(s.get("prompt_tokens", 0) for s in stats), 0),
                    _fmt(mean(s.get("target_prefill_tokens", 0) for s in stats), 0),
                    _fmt(mean(s.get("kv_cache_tokens", 0) for s in stats), 0),
                    _fmt(mean(s.get("draft_s", 0.0) for s in stats), 2),
                    _fmt(mean(s.get("total_s", 0.0) for s in stats), 2),
                    str(sum(1 for s in stats if s.get("same_as_full"))),
                ]
            )
        parts.append(f"Cost per answer ({length} tokens; means; `reused` = budget held the whole prompt):\n")
        header = [
            "method",
            "answers",
            "prompt tok",
            "target prefill tok",
            "KV entries",
            "draft s",
            "total s",
            "reused",
        ]
        parts.append(_table(header, cost_rows) + "\n")
    return "\n".join(parts)


def plot_accuracy(groups: Sequence[_Cells], path: Path) -> None:
    """One panel per group; a group whose cells hold different samples gets a second panel on
    the samples they all hold."""
    from matplotlib.figure import Figure

    panels: list[tuple[_Cells, str]] = []
    for cells in groups:
        title = f"{cells.target} @ {cells.length} tokens"
        matched = cells.matched
        if matched is None:
            panels.append((cells, title))
        else:  # the first panel's points stand on different samples; say so
            panels.append((cells, f"{title}\neach point on every sample it has"))
            panels.append((matched, f"{title}\nthe {matched.sample_count} samples every point has"))
    fig = Figure(figsize=(6.5 * max(len(panels), 1), 4.5), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (cells, title) in zip(axes, panels, strict=False):
        for method in dict.fromkeys(m for m, _ in cells.columns):
            if (method, None) in cells.columns:  # full and draft-alone do not depend on the budget
                value = cells.average((method, None))
                if value is not None:
                    style = "--" if method == "full" else ":"
                    ax.axhline(value, color="black", linestyle=style, label=method)
                continue
            points = [(b, cells.average((m, b))) for m, b in cells.columns if m == method]
            xs = [b for b, v in points if v is not None and b is not None]
            ys = [v for b, v in points if v is not None and b is not None]
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens / KV entries)")
        ax.set_ylabel("accuracy (avg over tasks, x100)")
        ax.set_ylim(-2, 102)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


# -- speed --------------------------------------------------------------------------------------
def _speed_means(records: Sequence[dict[str, Any]]) -> dict[tuple[int, str, int | None], dict[str, float]]:
    grouped: dict[tuple[int, str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        grouped[(r["length"], r["method"], r["budget"])].append(r)
    return {
        key: {
            "latency_s": mean(r["latency_s"] for r in rs),
            "kv_mib": mean(r["kv_cache_bytes"] for r in rs) / _MIB,
            "peak_mib": mean(r["peak_rss_growth_bytes"] for r in rs) / _MIB,
            "prompt_tokens": mean(r["stats"].get("prompt_tokens", 0) for r in rs),
            "prefill_tokens": mean(r["stats"].get("target_prefill_tokens", 0) for r in rs),
            "score": 100 * mean(r["score"] for r in rs),
            "runs": len(rs),
        }
        for key, rs in grouped.items()
    }


def _ratio(value: float, reference: float | None) -> str:
    return "–" if not reference else f"{value / reference:.2f}"


def speed_markdown(records: Sequence[dict[str, Any]]) -> str:
    parts = []
    targets = sorted({r["target"] for r in records})
    for target in targets:
        rs = [r for r in records if r["target"] == target]
        drafts = sorted({r["draft"] for r in rs if r.get("draft")})
        means = _speed_means(rs)
        parts.append(
            f"### Speed and memory: target `{target}`"
            + (f", draft `{', '.join(drafts)}`" if drafts else "")
            + " (end to end, one request at a time; ratios vs `full` at the same length)\n"
        )
        rows = []
        for (length, method, budget), m in sorted(
            means.items(), key=lambda kv: (kv[0][0], _method_order(kv[0][1]))
        ):
            full = means.get((length, "full", None)) or {}
            rows.append(
                [
                    str(length),
                    _label(method, budget),
                    _fmt(m["prompt_tokens"], 0),
                    _fmt(m["prefill_tokens"], 0),
                    _fmt(m["latency_s"], 2),
                    _ratio(m["latency_s"], full.get("latency_s")),
                    _fmt(m["kv_mib"], 1),
                    _ratio(m["kv_mib"], full.get("kv_mib")),
                    _fmt(m["peak_mib"], 0),
                    _ratio(m["peak_mib"], full.get("peak_mib")),
                    _fmt(m["score"], 0),
                    str(int(m["runs"])),
                ]
            )
        header = [
            "length",
            "method",
            "prompt tok",
            "target prefill tok",
            "latency s",
            "x full",
            "KV MiB",
            "x full",
            "peak RSS growth MiB",
            "x full",
            "score",
            "runs",
        ]
        parts.append(_table(header, rows) + "\n")
        parts.append(
            "Peak RSS growth is sampled every 5 ms above the process's memory before the request "
            "(models already loaded), so it is a lower bound; KV MiB is the target's prompt cache "
            "while decoding.\n"
        )
    return "\n".join(parts)


def plot_speed(records: Sequence[dict[str, Any]], latency_path: Path, memory_path: Path) -> None:
    from matplotlib.figure import Figure

    means = _speed_means(records)
    series: dict[str, list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for (length, method, budget), m in sorted(means.items()):
        series[_label(method, budget)].append((length, m))

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1]["latency_s"] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(latency_path, dpi=120)

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for label, points in series.items():
        xs = [p[0] for p in points]
        left.plot(xs, [p[1]["peak_mib"] for p in points], marker="o", label=label)
        right.plot(xs, [p[1]["kv_mib"] for p in points], marker="o", label=label)
    for ax, title in ((left, "peak RSS growth (MiB)"), (right, "target KV cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(memory_path, dpi=120)


# -- the whole report ---------------------------------------------------------------------------
def write_report(
    out_dir: str | Path,
    include: Sequence[str | Path] = (),
    *,
    samples: int | None = None,
    budgets: Sequence[int] | None = None,
) -> Path:
    """Rewrite ``results.md`` and the plots in ``out_dir`` from its records and those of the
    ``include`` directories (e.g. a run with another SpecPC width next to the main run; a record
    found in several directories counts once). ``samples`` keeps the accuracy records of the
    first ``samples`` sample indices, ``budgets`` those at these budgets (``full`` stays): a
    comparison on exactly the samples and budgets every method was run at."""
    out = Path(out_dir)
    directories = [out, *map(Path, include)]
    accuracy = [
        r
        for r in _merged(directories, SAMPLES_FILE)
        if (samples is None or r["index"] < samples)
        and (budgets is None or r["budget"] is None or r["budget"] in budgets)
    ]
    speed = _merged(directories, SPEED_FILE)
    sections = ["# spec-rag benchmark results\n"]
    shown = [f"records of {', '.join(f'`{d}`' for d in directories)}"] if include else []
    if samples is not None:
        shown.append(f"sample indices below {samples}")
    if budgets is not None:
        shown.append(f"budgets {', '.join(map(str, budgets))} (and `full`)")
    if shown:
        sections.append(f"Shown: {'; '.join(shown)}.\n")
    if accuracy:
        sections.append("## Accuracy\n")
        sections.append(f"![accuracy vs budget]({ACCURACY_PLOT})\n")
        groups = _accuracy_cells(accuracy)
        sections.append(accuracy_markdown(groups))
        plot_accuracy(groups, out / ACCURACY_PLOT)
    if speed:
        sections.append("## Speed\n")
        sections.append(f"![latency vs length]({LATENCY_PLOT})\n\n![memory vs length]({MEMORY_PLOT})\n")
        sections.append(speed_markdown(speed))
        plot_speed(speed, out / LATENCY_PLOT, out / MEMORY_PLOT)
    if not accuracy and not speed:
        sections.append(f"No records yet: run `python -m spec_rag.bench accuracy --out {out}`.\n")
    path = out / REPORT_FILE
    path.write_text("\n".join(sections), encoding="utf-8")
    return path


def _merged(directories: Sequence[Path], name: str) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    records = []
    for directory in directories:
        for r in _labelled(read_jsonl(directory / name)):
            ident = (r.get("key", ""), r["method"])
            if ident[0] and ident in seen:
                continue
            seen.add(ident)
            records.append(r)
    return records
