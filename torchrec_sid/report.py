"""Result tables for the terminal: what ``torchrec-sid train`` / ``quantize`` / ``demo`` print."""

from __future__ import annotations


def format_metric(value: float | dict[str, float], spec: str) -> str:
    """A metric that is one number, or one per signal (``text 0.12 / meta 0.03``)."""
    if isinstance(value, dict):
        return " / ".join(f"{name} {v:{spec}}" for name, v in value.items())
    return f"{value:{spec}}"


def format_results(results: list[dict]) -> str:
    """A table of runs: AUC / NE on test and cold items, parameters, training examples/s."""
    lines = [f"{'run':<28} {'test AUC':>8} {'test NE':>8} {'cold AUC':>8} {'cold NE':>8} {'params':>10} {'ex/s':>8}"]
    for r in results:
        m = r["metrics"]
        test, cold = m.get("test", {}), m.get("cold", {})
        lines.append(f"{r['name']:<28} {test.get('auc', float('nan')):>8.4f} {test.get('ne', float('nan')):>8.4f} "
                     f"{cold.get('auc', float('nan')):>8.4f} {cold.get('ne', float('nan')):>8.4f} "
                     f"{r['parameters']['total']:>10,} {r['train_examples_per_second']:>8.0f}")
    return "\n".join(lines)
