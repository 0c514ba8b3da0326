"""The report of a refinement (refine.py): DIR/report.html (self-contained), DIR/report.md and
the PNGs beside them.

What was refined (file, sha256, family, size), the config against the paper's, devices and memory
plan, the wall time of each phase; training curves of both stages on one step axis (loss, learning
rate, each head's NN-swap accuracy and NN similarity, k-NN of the live encoder and the EMA); the
per-block k-NN before and after; the evaluation before / after with the deltas; the exports with
their checksums; the warnings met. Plots as the others here: y from 0 where it is a percentage
(else marked), the test-set size named.
"""

import base64
import html
import json
import os
import shutil

import numpy as np

VERSION = 3  # bump when the report changes: a rerun then writes it again
CURVES_PNG, PER_BLOCK_PNG = "report_curves.png", "report_per_block.png"


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def curves(stage_dirs: dict) -> dict:
  """{metric: [(global step, value)]} of both stages, stage 3's steps after stage 2's last."""
  out, offset, boundary = {}, 0, None
  for stage in (2, 3):
    rows = [r for r in read_metrics(stage_dirs[stage]) if not any(k.startswith("eval/")
                                                                  for k in r)]
    for row in rows:
      for name, value in row.items():
        if name in ("step", "wall_time") or not isinstance(value, (int, float)):
          continue
        out.setdefault(name, []).append((offset + row["step"], float(value), stage))
    if stage == 2:
      offset = max((r["step"] for r in rows), default=0)
      boundary = offset
  return dict(series=out, boundary=boundary)


def plot_curves(data: dict, path: str, test_size: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  series, boundary = data["series"], data["boundary"]
  panels = [
      ("loss (sum over heads)", [("loss", "loss")], False),
      ("learning rate", [("lr", "lr")], False),
      ("NN-swap accuracy (%): the label of the nearest queue entry",
       [(k.split("/")[0], k) for k in sorted(series) if k.endswith("/nn_accuracy")], True),
      ("NN similarity (cosine)", [(k.split("/")[0], k) for k in sorted(series)
                                  if k.endswith("/nn_similarity")], False),
      (f"k-NN accuracy (%) on {test_size}",
       [(k.replace("knn_ema/", "EMA ").replace("knn/", "live "), k) for k in sorted(series)
        if (k.startswith("knn/") or k.startswith("knn_ema/")) and "/head/" not in k], True),
  ]
  fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True)
  for ax, (title, lines, percent) in zip(axes, panels):
    for n, (label, key) in enumerate(lines):
      for stage in (2, 3):  # one line per stage: no segment across the boundary
        points = [(x, y) for x, y, s in series.get(key, []) if s == stage]
        if not points:
          continue
        steps, values = zip(*points)
        values = 100 * np.asarray(values) if percent else np.asarray(values)
        ax.plot(steps, values, "o-" if len(steps) < 12 else "-", ms=3, color=f"C{n}",
                label=label if not ax.get_legend_handles_labels()[1].count(label) else None,
                clip_on=False)
    if percent:
      ax.set_ylim(0, 100)
    else:  # the axis is not from 0: say so
      title += " (y not from 0)" if ax.has_data() and ax.get_ylim()[0] > 0 else ""
    if boundary is not None:
      ax.axvline(boundary, color="black", lw=0.8, ls="--")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.has_data() and len(lines) > 1:
      ax.legend(fontsize=7, loc="best")
    if not ax.has_data():
      ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center",
              transform=ax.transAxes, fontsize=8)
  axes[-1].set_xlabel("step (stage 2, then stage 3 from the dashed line)")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def eval_rows(evaluation: dict) -> list[tuple[str, float | None, float | None]]:
  """(metric, before, after) of every scalar of the evaluation suite."""
  before, after = evaluation["scalars"]["before"], evaluation["scalars"]["refined"]
  return [(k, before.get(k), after.get(k)) for k in sorted(set(before) | set(after))]


def _pct(v):  # the suite's scalars are in percent already (suite.scalars)
  return "-" if v is None else f"{v:.1f}"


def diff_rows(diff: dict) -> list[tuple[str, str, str]]:
  """One row per field that differs from the paper config in either stage."""
  by_field = {}
  for stage in (2, 3):
    for field, paper, used in diff[stage]:
      by_field.setdefault(field, {2: None, 3: None})[stage] = (str(paper), str(used))
  rows = []
  for field, stages in sorted(by_field.items()):
    pairs = [stages[st] or (None, None) for st in (2, 3)]
    cell = lambda i: (pairs[0][i] if pairs[0][i] == pairs[1][i] or pairs[1][i] is None
                      else pairs[1][i] if pairs[0][i] is None
                      else f"{pairs[0][i]} / {pairs[1][i]}")
    rows.append((field, cell(0), cell(1)))
  return rows


def _sections(s: dict) -> list[tuple[str, list]]:
  """The report as (title, [("p", text) | ("table", header, rows) | ("img", file, alt) |
  ("pre", text)]) for both renderings."""
  d = s["detected"]
  ev = s["evaluation"]
  out = [("What was refined", [
      ("table", ("", ""), [
          ("file", d["path"]), ("sha256", d["sha256"]), ("format", d["format"]),
          ("family", d["family"]), ("size", f"{d['size']} (width {d['vit_kwargs']['width']}, "
                                            f"depth {d['vit_kwargs']['depth']})"),
          ("patch size", str(d["patch_size"])), ("parameters", f"{d['num_params']:,}"),
          ("config", s["chosen"]), ("training data", f"{s['train']} ({s['num_train']:,} images)"),
          ("evaluation", f"train {s['eval_train']}, test {s['eval_test']}"),
          ("command", s["command"])])])]
  rows = [(k, _pct(a), _pct(b), "-" if a is None or b is None else f"{b - a:+.1f}")
          for k, a, b in eval_rows(ev)]
  out.append((f"Evaluation before / after (%; test {ev['test']}, {ev['num_test']:,} images; "
              f"protocols {', '.join(ev['protocols'])})", [
                  ("table", ("metric", "before", "refined", "delta"), rows)]))
  out.append(("Training curves", [("img", CURVES_PNG, "training curves of stage 2 and 3")]))
  out.append(("k-NN accuracy per block, before and after", [
      ("img", PER_BLOCK_PNG, "per-block k-NN") if s.get("per_block") else
      ("p", "(the per_block protocol was not run)")]))
  out.append(("Wall time per phase", [("table", ("phase", "seconds", "finished"), [
      (name, f"{p['seconds']:.0f}", (p["finished"] or "") + (" (reused)" if p.get("reused")
                                                            else ""))
      for name, p in s["phases"].items()])]))
  out.append(("Devices and memory plan", [
      ("p", f"{s['devices']}, {s['gib']:.2f} GiB per device: {s['plan']['said']}"),
      ("pre", s["plan"]["table"])]))
  out.append(("Exports", [("table", ("format", "path", "sha256"), [
      (e["name"], e["path"] or e["note"], e.get("sha256", "-")) for e in s["exports"]])]))
  out.append(("Warnings met during the run", [
      ("table", ("warning",), [(w,) for w in s["warnings"]]) if s["warnings"] else
      ("p", "none")]))
  rows = diff_rows(s["diff"])
  out.append(("Config against the paper config", [
      ("details", f"{len(rows)} fields differ (values 'stage 2 / stage 3' where the stages "
                  "differ)", ("field", "paper", "this run"), rows) if rows else
      ("p", "identical to the paper config (or no paper config to compare with)")]))
  return out


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
       "font-size:13px;text-align:left;overflow-wrap:anywhere}th{background:#eee}"
       "td:first-child{white-space:nowrap}"
       "pre{background:#f6f6f6;padding:8px;font-size:12px}img{max-width:100%}"
       "h2{border-bottom:1px solid #ddd;font-size:18px}")


def _html(summary: dict, workdir: str) -> str:
  parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>MIM-Refiner report</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>MIM-Refiner report: {html.escape(os.path.basename(summary['detected']['path']))}"
           "</h1>"]
  for title, items in _sections(summary):
    parts.append(f"<h2>{html.escape(title)}</h2>")
    for item in items:
      if item[0] == "p":
        parts.append(f"<p>{html.escape(item[1])}</p>")
      elif item[0] == "pre":
        parts.append(f"<pre>{html.escape(item[1])}</pre>")
      elif item[0] == "img":
        with open(os.path.join(workdir, item[1]), "rb") as f:
          data = base64.b64encode(f.read()).decode()
        parts.append(f"<img alt='{html.escape(item[2])}' src='data:image/png;base64,{data}'>")
      else:
        summary = item[1] if item[0] == "details" else None
        header, rows = item[-2:]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header) if any(header) else ""
        table = ("<table>" + (f"<tr>{head}</tr>" if head else "") + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows) + "</table>")
        parts.append(f"<details><summary>{html.escape(summary)}</summary>{table}</details>"
                     if summary else table)
  parts.append("</body></html>")
  return "\n".join(parts)


def _md(summary: dict) -> str:
  lines = [f"# MIM-Refiner report: {os.path.basename(summary['detected']['path'])}", ""]
  cell = lambda c: str(c).replace("|", "\\|")
  for title, items in _sections(summary):
    lines += [f"## {title}", ""]
    for item in items:
      if item[0] == "p":
        lines += [item[1], ""]
      elif item[0] == "pre":
        lines += ["```", item[1], "```", ""]
      elif item[0] == "img":
        lines += [f"![{item[2]}]({item[1]})", ""]
      else:
        if item[0] == "details":
          lines += [item[1], ""]
        header, rows = item[-2:]
        header = header if any(header) else ("", "")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows] + [""]
  return "\n".join(lines)


def write(workdir: str, summary: dict) -> dict:
  """Writes the PNGs, report.md and report.html into `workdir`; returns their paths."""
  ev = summary["evaluation"]
  data = curves({s: os.path.join(workdir, f"stage{s}") for s in (2, 3)})
  plot_curves(data, os.path.join(workdir, CURVES_PNG),
              f"{ev['num_test']:,} test images ({summary['eval_test']})")
  per_block = os.path.join(workdir, "evaluation", "per_block.png")
  summary = dict(summary, per_block=os.path.exists(per_block))
  if summary["per_block"]:
    shutil.copyfile(per_block, os.path.join(workdir, PER_BLOCK_PNG))
  paths = dict(html=os.path.join(workdir, "report.html"), md=os.path.join(workdir, "report.md"),
               curves=os.path.join(workdir, CURVES_PNG))
  for name, text in (("md", _md(summary)), ("html", _html(summary, workdir))):
    with open(paths[name] + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(paths[name] + ".tmp", paths[name])
  return paths
