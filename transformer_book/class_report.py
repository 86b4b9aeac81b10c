"""What a class got wrong: ``python -m transformer_book.grade ... --report PATH.html``.

Every failed check names a likely misconception, so a batch of graded notebooks says
which ones the class holds. For each exercise the report gives how many notebooks
passed it and its most frequent failure messages with their counts (messages that
differ only in their numbers, such as a largest difference, count as one), with a bar
chart of the pass rates. HTML (``.html``) or Markdown (``.md``); the chart is a PNG
embedded in the file, so the report is one file that opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .grading import BadInput, NotebookResult

FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown"}
TOP = 5  # failure messages shown per exercise
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")


def report_format(path: Path) -> str:
    """"html" or "markdown", from the file name (raises BadInput)."""
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise BadInput(
            f"--report {path}: give a file name ending in .html or .md."
        ) from None


@dataclass
class ExerciseSummary:
    label: str
    notebooks: int = 0
    passed: int = 0
    failures: Counter = field(default_factory=Counter)  # message pattern -> count
    examples: dict = field(default_factory=dict)  # message pattern -> the first message
    varied: set = field(default_factory=set)  # patterns whose messages differ

    @property
    def rate(self) -> float:
        return self.passed / self.notebooks if self.notebooks else 0.0

    def top(self, n: int = TOP) -> list[tuple[str, int, bool]]:
        """The ``n`` most frequent failures: (message, count, whether numbers vary)."""
        return [(self.examples[k], count, k in self.varied)
                for k, count in self.failures.most_common(n)]


def summarise(results: list[NotebookResult]) -> list[ExerciseSummary]:
    """One summary per exercise, in course order (chapter, then exercise number)."""
    by_label: dict[tuple, ExerciseSummary] = {}
    for notebook in results:
        for r in notebook.results:
            key = (notebook.chapter, tuple(int(p) for p in r.exercise.number.split(".")
                                           if p.isdigit()), r.exercise.label)
            summary = by_label.setdefault(key, ExerciseSummary(r.exercise.label))
            summary.notebooks += 1
            if r.passed:
                summary.passed += 1
                continue
            pattern = _NUMBER.sub("…", r.message)
            summary.failures[pattern] += 1
            first = summary.examples.setdefault(pattern, r.message)
            if first != r.message:
                summary.varied.add(pattern)
    return [by_label[key] for key in sorted(by_label)]


def chart_png(summaries: list[ExerciseSummary]) -> bytes:
    """A horizontal bar chart of the pass rate of each exercise (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    height = 0.9 + 0.32 * len(summaries)
    fig = Figure(figsize=(8, height), dpi=100)
    ax = fig.add_subplot()
    labels = [s.label for s in summaries][::-1]
    rates = [100 * s.rate for s in summaries][::-1]
    bars = ax.barh(labels, rates, color=["#2a9d8f" if r >= 50 else "#e76f51" for r in rates])
    for bar, s in zip(bars, summaries[::-1]):
        ax.text(min(bar.get_width() + 1, 88), bar.get_y() + bar.get_height() / 2,
                f"{s.passed}/{s.notebooks}", va="center", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("notebooks that pass the exercise (%)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def render(results: list[NotebookResult], kind: str) -> str:
    summaries = summarise(results)
    image = base64.b64encode(chart_png(summaries)).decode("ascii") if summaries else ""
    notebooks = len(results)
    complete = sum(n.passed == n.total for n in results)
    heading = (f"{notebooks} notebooks graded, {complete} with every exercise passed; "
               f"{len(summaries)} exercises.")
    if kind == "markdown":
        return _markdown(summaries, image, heading)
    return _html(summaries, image, heading)


def _markdown(summaries, image, heading) -> str:
    lines = ["# Class report", "", heading, ""]
    if image:
        lines += [f"![Pass rate per exercise](data:image/png;base64,{image})", ""]
    lines += ["| Exercise | Passed | Pass rate |", "|---|---:|---:|"]
    lines += [f"| {s.label} | {s.passed}/{s.notebooks} | {100 * s.rate:.0f}% |"
              for s in summaries]
    for s in summaries:
        lines += ["", f"## {s.label}", "",
                  f"{s.passed} of {s.notebooks} notebooks pass ({100 * s.rate:.0f}%)."]
        top = s.top()
        if top:
            lines += ["", "Most frequent failures:", ""]
            lines += [f"- {count} × {message}" + (" (numbers vary)" if varied else "")
                      for message, count, varied in top]
    return "\n".join(lines) + "\n"


def _html(summaries, image, heading) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(s.label)}</td><td class=n>{s.passed}/{s.notebooks}</td>"
        f"<td class=n>{100 * s.rate:.0f}%</td></tr>"
        for s in summaries
    )
    sections = []
    for s in summaries:
        items = "".join(
            f"<li><b>{count} ×</b> {e(message)}"
            + (" <i>(numbers vary)</i>" if varied else "") + "</li>"
            for message, count, varied in s.top()
        )
        failures = f"<p>Most frequent failures:</p><ul>{items}</ul>" if items else ""
        sections.append(
            f"<h2>{e(s.label)}</h2><p>{s.passed} of {s.notebooks} notebooks pass "
            f"({100 * s.rate:.0f}%).</p>{failures}"
        )
    chart = (f'<img alt="Pass rate per exercise" src="data:image/png;base64,{image}">'
             if image else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Class report</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; }}
td.n {{ text-align: right; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>Class report</h1>
<p>{e(heading)}</p>
{chart}
<table><tr><th>Exercise</th><th>Passed</th><th>Pass rate</th></tr>
{rows}
</table>
{"".join(sections)}
</body></html>
"""


def write(path: Path, results: list[NotebookResult]) -> None:
    path.write_text(render(results, report_format(path)), encoding="utf-8")
