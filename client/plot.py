"""`codelen plot`: a distance matrix as a heatmap under its hierarchical-clustering dendrogram
(average linkage), rows and columns in dendrogram order — the picture of CompLearn's `maketree`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.matrix import Matrix


def distances(m: Matrix) -> np.ndarray:
    """A symmetric distance with a zero diagonal. NCD is one already (its diagonal is not 0 with a
    real compressor, and a matrix from the API is symmetric; both are enforced here). Shared
    information is a similarity in bits, normalised by each dataset's information with itself."""
    v = np.asarray(m.values, dtype=float)
    if m.metric == "shared_information":
        self_info = np.sqrt(np.clip(np.outer(np.diag(v), np.diag(v)), 1e-12, None))
        v = 1.0 - v / self_info
    d = np.clip((v + v.T) / 2, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return d


def linkage(m: Matrix) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    return scipy_linkage(squareform(distances(m), checks=False), method="average")


def clusters(m: Matrix, k: int) -> list[int]:
    """Flat cluster number of each dataset when the dendrogram is cut into k clusters."""
    from scipy.cluster.hierarchy import fcluster

    return [int(c) for c in fcluster(linkage(m), k, criterion="maxclust")]


def plot(m: Matrix, out: Path, *, title: str | None = None, k: int | None = None) -> list[str]:
    """Draw the PNG (or any format matplotlib writes); returns the labels in dendrogram order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    n = len(m.ids)
    z = linkage(m)
    threshold = None
    if k and 1 < k <= n:
        threshold = float(z[-(k - 1), 2] + z[-k, 2]) / 2  # between the merges that leave k clusters
    side = max(6.0, min(30.0, 3.0 + 0.42 * n))
    longest = max(len(s) for s in m.ids)
    fig = plt.figure(figsize=(side + 0.08 * longest + 1.2, side + 1.4 + 0.08 * longest))
    grid = fig.add_gridspec(
        2, 2, height_ratios=[1.6, side], width_ratios=[side, 0.25], hspace=0.02, wspace=0.03,
        left=0.04 + 0.012 * longest, right=0.9, top=0.93, bottom=0.03 + 0.012 * longest,
    )
    tree_ax = fig.add_subplot(grid[0, 0])
    heat_ax = fig.add_subplot(grid[1, 0])
    bar_ax = fig.add_subplot(grid[1, 1])

    with plt.rc_context({"lines.linewidth": 1.4}):
        tree = dendrogram(z, ax=tree_ax, labels=m.ids, no_labels=True, color_threshold=threshold,
                          above_threshold_color="0.45")
    low, high = float(z[:, 2].min()), float(z[:, 2].max())
    tree_ax.set_ylim(max(0.0, low - 0.3 * (high - low + 1e-9)), high * 1.02 + 1e-9)  # room for the merges
    tree_ax.set_axis_off()
    order = tree["leaves"]
    labels = [m.ids[i] for i in order]
    shown = np.asarray(m.values, dtype=float)[np.ix_(order, order)]
    # The colour scale spans the off-diagonal values: the diagonal (a dataset against itself)
    # would otherwise stretch it and wash out the blocks the tree found.
    off = shown[~np.eye(n, dtype=bool)]
    lo, hi = float(np.nanmin(off)), float(np.nanmax(off))
    cmap = "viridis" if m.metric == "ncd" else "viridis_r"
    image = heat_ax.imshow(shown, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    heat_ax.set_xticks(range(n), labels, rotation=90, fontsize=9)
    heat_ax.set_yticks(range(n), labels, fontsize=9)
    heat_ax.tick_params(length=0)
    for ticks in (heat_ax.get_xticklabels(), heat_ax.get_yticklabels()):
        for tick, colour in zip(ticks, tree["leaves_color_list"], strict=True):
            tick.set_color(colour if colour != "0.45" else "black")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = shown[i, j]
                bright = min(1.0, max(0.0, (v - lo) / (hi - lo + 1e-12)))
                dark_text = bright > 0.55 if m.metric == "ncd" else bright < 0.45
                fmt = f"{v:.2f}" if m.metric == "ncd" else f"{v:.0f}"
                heat_ax.text(j, i, fmt, ha="center", va="center", fontsize=7, color="black" if dark_text else "white")
    cbar = fig.colorbar(image, cax=bar_ax)
    ncd = m.metric == "ncd"
    cbar.set_label("NCD (lower = more alike)" if ncd else "shared information, bits (higher = more shared)")
    name = "NCD" if ncd else "Shared information"
    fig.suptitle(title or f"{name} of {n} datasets, average-linkage tree", fontsize=13)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return labels
