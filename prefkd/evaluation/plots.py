"""The report's figures: standalone matplotlib Agg figures (no pyplot state) with deterministic PNG bytes."""

from __future__ import annotations

import io
import math

DPI = 100
SMOOTH_WINDOW = 8  # running-mean window (steps) of the reward-accuracy curves


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 3.6)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def png_bytes(fig) -> bytes:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "prefkd", "path.simplify": True}):
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def plot_benchmarks(rows: list[dict], labels: list[str]) -> bytes | None:
    """Grouped bars: one group per task (and the average), one bar per model; error bars of one standard
    error where a row's ``errors`` has one for the column."""
    columns = labels + ["avg"]
    if not rows or not labels:
        return None
    fig, (ax,) = figure(size=(max(6.4, 1.2 * len(columns) + 2), 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        vals = r["values"]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, c in enumerate(columns) if vals.get(c) is not None]
        ys = [vals[c] for c in columns if vals.get(c) is not None]
        errs = [(r.get("errors") or {}).get(c) for c in columns if vals.get(c) is not None]
        yerr = [e if is_number(e) else 0.0 for e in errs] if any(is_number(e) for e in errs) else None
        ax.bar(xs, ys, width=width, label=r["label"], color=f"C{i % 10}", yerr=yerr, capsize=2, ecolor="0.3")
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("score x100")
    ax.set_title("Benchmarks")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return png_bytes(fig)


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(metrics: dict[str, list[dict]]) -> bytes | None:
    """Loss against step, one line per run; teacher runs left, student runs right."""
    groups = {"teacher runs": [], "student runs": []}
    for name, rows in metrics.items():
        if rows:
            groups["teacher runs" if name.startswith("teacher") else "student runs"].append(name)
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    fig, axes = figure(1, len(groups), size=(5.0 * len(groups), 3.6))
    color = {name: f"C{i % 10}" for i, name in enumerate(metrics)}
    for ax, (title, names) in zip(axes, groups.items()):
        losses = [r["loss"] for n in names for r in metrics[n]]
        for n in names:
            ax.plot(
                [r["step"] for r in metrics[n]], [r["loss"] for r in metrics[n]], label=n, color=color[n], linewidth=1
            )
        if min(losses) > 0 and max(losses) / min(losses) > 20:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    return png_bytes(fig)


def plot_reward_accuracy(metrics: dict[str, list[dict]]) -> bytes | None:
    """rewards/accuracy of the preference runs against step, as a running mean."""
    runs = {n: [r for r in rows if is_number(r.get("rewards/accuracy"))] for n, rows in metrics.items()}
    runs = {n: rows for n, rows in runs.items() if rows}
    if not runs:
        return None
    fig, (ax,) = figure()
    for i, (n, rows) in enumerate(runs.items()):
        acc = _running_mean([r["rewards/accuracy"] for r in rows], SMOOTH_WINDOW)
        ax.plot([r["step"] for r in rows], acc, label=n, color=f"C{i % 10}", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"rewards/accuracy (running mean of {SMOOTH_WINDOW})")
    ax.set_title("Training reward accuracy")
    ax.legend(fontsize=7)
    return png_bytes(fig)


OBJECTIVE_KEYS = ("objective/beta_margin", "objective/saturated")


def plot_objective(metrics: dict[str, list[dict]]) -> bytes | None:
    """Per preference run, against step (running means): the mean beta * margin and the share of pairs whose loss
    gradient factor is saturated (above 0.99: the loss pushes them at full strength whatever their margin)."""
    runs = {n: [r for r in rows if all(is_number(r.get(k)) for k in OBJECTIVE_KEYS)] for n, rows in metrics.items()}
    runs = {n: rows for n, rows in runs.items() if rows}
    if not runs:
        return None
    fig, axes = figure(1, 2, size=(10.0, 3.6))
    for i, (n, rows) in enumerate(runs.items()):
        for ax, key in zip(axes, OBJECTIVE_KEYS):
            values = _running_mean([r[key] for r in rows], SMOOTH_WINDOW)
            ax.plot([r["step"] for r in rows], values, label=n, color=f"C{i % 10}", linewidth=1)
    axes[0].set_ylabel(f"beta * margin (running mean of {SMOOTH_WINDOW})")
    axes[1].set_ylabel("share of saturated pairs")
    axes[1].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].set_title("Preference objective")
    axes[0].legend(fontsize=7)
    return png_bytes(fig)


def plot_weight_histograms(weights: dict) -> bytes | None:
    """Per signal set: the chosen and rejected unit-weight histograms (last bin includes larger values)."""
    sets = {
        name: w
        for name, w in weights.items()
        if isinstance(w, dict) and w.get("weight_bins") and any(sum(h) for h in (w.get("weight_hist") or {}).values())
    }
    if not sets:
        return None
    ncols = min(3, len(sets))
    nrows = -(-len(sets) // ncols)
    fig, axes = figure(nrows, ncols, size=(3.6 * ncols + 0.6, 3.0 * nrows + 0.2))
    for ax in axes[len(sets) :]:
        ax.set_axis_off()
    for ax, (name, w) in zip(axes, sets.items()):
        bins = w["weight_bins"]
        step = bins[1] - bins[0] if len(bins) > 1 else 1.0
        for i, side in enumerate(("chosen", "rejected")):
            hist = (w["weight_hist"] or {}).get(side)
            if hist:
                ax.bar(bins[: len(hist)], hist, width=step, align="edge", alpha=0.55, label=side, color=f"C{i}")
        ax.set_title(f"{name} ({w.get('unit', '?')})", fontsize=9)
        ax.set_xlabel("weight")
        ax.set_ylabel("units")
        ax.legend(fontsize=7)
    return png_bytes(fig)


def plot_span_sizes(alignment: dict) -> bytes | None:
    """Bars of the span-size histogram (tokens of the larger side per aligned span), all splits."""
    hist = (alignment.get("all") or {}).get("span_size_hist") or {}
    if not hist or not sum(hist.values()):
        return None
    keys = sorted(hist, key=lambda k: int(str(k).rstrip("+")))
    fig, (ax,) = figure(size=(5.0, 3.2))
    ax.bar(range(len(keys)), [hist[k] for k in keys], color="C0")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_xlabel("span size (tokens, larger side)")
    ax.set_ylabel("spans")
    ax.set_title("Aligned span sizes")
    return png_bytes(fig)


# ---------------------------------------------------------------------------
# Sections
