"""The suite's table: per task and shown metric, the model's median over seeds with its range,
the baseline's beside it and the difference of the medians; Markdown and JSON (every run's
scores too)."""

from __future__ import annotations

import json
import statistics


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values)}


def table(results: list[dict], tasks: list, model: str, baseline: str | None) -> dict:
    """{"rows": [{task, metric, model: summary, baseline: summary, difference}], "runs": results}."""
    rows = []
    for task in tasks:
        for metric in task.shown:
            row = {"task": task.name, "metric": metric}
            for name, key in ((model, "model"), (baseline, "baseline")):
                values = [r["scores"][metric] for r in results if r["task"] == task.name and r["model"] == name]
                if name is not None and values:
                    row[key] = summary(values)
            if "baseline" in row and "model" in row:
                row["difference"] = row["model"]["median"] - row["baseline"]["median"]
            rows.append(row)
    return {"model": model, "baseline": baseline, "rows": rows, "runs": results}


def cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["seeds"] == 1:
        return f"{entry['median']:.2f}"
    return f"{entry['median']:.2f} ({entry['min']:.2f}-{entry['max']:.2f})"


def markdown(report: dict, header: str) -> str:
    baseline = report["baseline"]
    columns = ["task", "metric", f"{report['model']}: median (range)"]
    columns += [f"{baseline}: median (range)", "difference"] if baseline else []
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in report["rows"]:
        cells = [row["task"], row["metric"], cell(row.get("model"))]
        if baseline:
            cells += [cell(row.get("baseline")), f"{row['difference']:+.2f}" if "difference" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def as_json(report: dict) -> str:
    return json.dumps(report, indent=1) + "\n"
