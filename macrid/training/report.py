"""Run outputs: the machine-readable metrics file and the learning-curve figure."""

from __future__ import annotations
# matplotlib: imported inside the functions that use it. Importing it is a start-up cost (matplotlib.pyplot
# about 1.7 s on the development VM) that the paths without plots need not pay.


def plot_learning_curve(history: list[dict], path: str, title: str) -> None:
    """Training loss terms and validation NDCG@100 per epoch, two panels, one PNG."""
    import matplotlib  # here, not at import: every job that imports the training code would pay ~1 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["nll"] for h in history], label="reconstruction NLL")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("NLL per user")
    ax1b = ax1.twinx()
    ax1b.plot(epochs, [h["kl"] for h in history], color="tab:orange", label="KL")
    ax1b.set_ylabel("KL per user")
    ax1.legend(loc="center right", handles=ax1.get_lines() + ax1b.get_lines(), fontsize=8)
    val = [(h["epoch"], h["val_ndcg@100"]) for h in history if "val_ndcg@100" in h]
    if val:
        ax2.plot(*zip(*val), marker=".", color="tab:green")
        best = max(val, key=lambda v: v[1])
        ax2.axvline(best[0], color="grey", ls="--", lw=0.8)
        ax2.set_title(f"best {best[1]:.4f} at epoch {best[0]}", fontsize=9)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation NDCG@100")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_metrics(m: dict) -> str:
    parts = [f"{k} {m[k][0]:.4f}±{m[k][1]:.4f}" for k in ("ndcg@100", "recall@20", "recall@50") if k in m]
    if "independence" in m:
        parts.append(f"independence {m['independence']:.3f}")
    return "  ".join(parts)
