"""One self-contained HTML page per run: what the model discovered, how it aligns with genres, how it learned.

Sections: the run's metrics; each concept with its top items by title; the alignment of the learned item
concepts with the dataset's genres (NMI, ARI, purity); a 2-D map of the items coloured by learned concept
and by genre, with a user's components; micro disentanglement (|corr| between the dimensions of the test
users' components, and their independence); example traversals (Sec. 2.4); the learning curve. Images are
PNGs embedded as data: URIs, so the file can be mailed or served as it is.

The genre rule (first listed genre; any-genre purity) is stated in macrid/output/alignment.py.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import polars as pl

from macrid.data import lake, layout
from macrid.data.batches import load_dataset, snapshot_uri
from macrid.model.vae import item_concept
from macrid.output.alignment import genre_alignment
from macrid.output.explain import Run, traversal
from macrid.training.metrics import independence
from macrid.training.run_folder import METRICS_FILE
# matplotlib: imported inside the functions that use it. Importing it is a start-up cost (matplotlib.pyplot
# about 1.7 s on the development VM) that the paths without plots need not pay.

TOP_ITEMS = 8


def build(lake_root: str, run_name: str, traversals: int = 2) -> str:
    """The report's HTML for a finished MacridVAE run."""
    run = Run(lake_root, run_name)
    snap = snapshot_uri(lake_root, run.record["dataset"], run.record["version"])
    items = pl.from_arrow(lake.read_table(lake.join(snap, "items"))).sort("item_idx")
    hn = run.h / np.linalg.norm(run.h, axis=1, keepdims=True)  # (M, D)
    c = run.c.numpy()  # (M, K) Eq. 6, computed once by Run
    concept = item_concept(run.c).numpy()  # (M,) the mode, as steering and the export have it
    genres = items["genres"].to_list()
    genre = [g[0] if g is not None and len(g) else None for g in genres]
    metrics = lake.read_json(lake.join(layout.run_uri(lake_root, run_name), METRICS_FILE))
    parts = [_header(run_name, metrics), _concepts(items, c, concept), _alignment(concept, genres),
             _map(hn, concept, genre, run), _micro(run), _traversals(run, items, concept, traversals),
             _curve(lake_root, run_name)]
    return _page(run_name, "\n".join(parts))


def _header(run_name: str, metrics: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(split)}</th>" + "".join(
        f"<td>{metrics[split][k][0]:.4f} ± {metrics[split][k][1]:.4f}</td>" for k in ("ndcg@100", "recall@20",
                                                                                      "recall@50"))
        + f"<td>{metrics[split].get('independence', float('nan')):.3f}</td></tr>" for split in ("val", "test"))
    cfg = metrics["config"]["model"]
    return (f"<section id='metrics'><h2>Metrics</h2><p>dataset {html.escape(metrics['dataset'])}, "
            f"K = {cfg['K']}, D = {cfg['D']}, τ = {cfg['tau']}, best epoch {metrics['best_epoch']} of "
            f"{metrics['epochs_run']}</p><table><tr><th></th><th>NDCG@100</th><th>Recall@20</th><th>Recall@50</th>"
            f"<th>independence</th></tr>{rows}</table></section>")


def _concepts(items: pl.DataFrame, c: np.ndarray, concept: np.ndarray) -> str:
    """Each concept's most typical popular items: the concept's members ranked by c_ik * log(1 + train count)."""
    counts = items["train_count"].to_numpy() if "train_count" in items.columns else np.ones(len(items))
    titles = [t or str(i) for t, i in zip(items["title"].to_list(), items["item_id"].to_list())]
    blocks = []
    for k in range(c.shape[1]):
        members = np.flatnonzero(concept == k)
        order = members[np.argsort(-(c[members, k] * np.log1p(counts[members])))][:TOP_ITEMS]
        names = "".join(f"<li>{html.escape(titles[i])}</li>" for i in order)
        blocks.append(f"<div class='concept'><h3>concept {k} <small>({len(members):,} items)</small></h3>"
                      f"<ol>{names or '<li>(no item)</li>'}</ol></div>")
    return f"<section id='concepts'><h2>Concepts and their top items</h2><div class='grid'>{''.join(blocks)}</div></section>"


def _alignment(concept: np.ndarray, genres: list) -> str:
    found = genre_alignment(concept, genres)
    if found["items"] < 2:
        return "<section id='alignment'><h2>Genre alignment</h2><p>The dataset has no genres.</p></section>"
    rows = [("NMI", found["nmi"]), ("ARI", found["ari"]), ("purity (first genre)", found["purity"]),
            ("any-genre purity", found["any_genre_purity"])]
    table = "".join(f"<tr><th>{n}</th><td>{v:.3f}</td></tr>" for n, v in rows)
    return (f"<section id='alignment'><h2>Genre alignment</h2><p>Learned item concepts (argmax c_ik) against the "
            f"first listed genre of {found['items']:,} items ({found['genres']} genres).</p><table>{table}</table>"
            f"</section>")


def _map(hn: np.ndarray, concept: np.ndarray, genre: list, run: Run) -> str:
    fig = item_map(hn, concept, genre, run)
    return (f"<section id='map'><h2>Item map</h2>{_img(fig, 'items by concept and by genre')}<p>The two principal "
            "axes of the unit item vectors h_i; the colours on the left are the model's concepts, on the right the "
            "dataset's genres.</p></section>")


def item_map(hn: np.ndarray, concept: np.ndarray, genre: list, run: Run):
    """Fig. 2-style: items on the two principal axes of h (unit norm), coloured by concept and by first genre,
    with the prototypes and one user's K components. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centred = hn - hn.mean(0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2].T  # (D, 2)
    xy = centred @ axes
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True, sharey=True)  # same axes: same places
    a1.scatter(xy[:, 0], xy[:, 1], c=concept, cmap="tab10", s=5, alpha=0.7)
    protos = (run.m / np.linalg.norm(run.m, axis=1, keepdims=True) - hn.mean(0)) @ axes
    a1.scatter(protos[:, 0], protos[:, 1], marker="*", s=220, c=range(len(protos)), cmap="tab10", edgecolors="k")
    users = pl.from_arrow(lake.read_table(lake.join(snapshot_uri(run.lake, run.record["dataset"],
                                                                 run.record["version"]), "users")))
    user = str(users["user_id"][0])
    mu = run.components(run.user_items(user)).numpy()  # (K, D)
    comps = (mu / np.linalg.norm(mu, axis=1, keepdims=True) - hn.mean(0)) @ axes
    a1.scatter(comps[:, 0], comps[:, 1], marker="X", s=120, c=range(len(comps)), cmap="tab10", edgecolors="k")
    a1.set_title(f"items by learned concept (stars: prototypes, X: user {user}'s components)", fontsize=9)
    names = sorted({x for x in genre if x is not None})
    codes = np.array([names.index(x) if x is not None else -1 for x in genre])
    a2.scatter(xy[codes >= 0, 0], xy[codes >= 0, 1], c=codes[codes >= 0], cmap="tab20", s=5, alpha=0.7)
    a2.set_title("items by first genre")
    for a in (a1, a2):
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return fig


REPORT_USERS = 2000  # test users whose components feed the micro-disentanglement figure


def _micro(run: Run) -> str:
    """Micro disentanglement: |corr| between the D dimensions of the test users' components (each of the K
    components one sample, as the independence score of Sec. 3.4 counts them), and its histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = load_dataset(run.lake, run.record["dataset"], with_train=False, version=run.record["version"]).test
    rows = np.arange(min(REPORT_USERS, len(test.user_idx)))
    idx, off = test.foldin.take(rows)
    mu = run.model.represent(idx, off).reshape(-1, run.D).numpy()  # (users * K, D)
    x = mu - mu.mean(0)
    corr = np.abs(np.corrcoef(x, rowvar=False))  # (D, D)
    np.fill_diagonal(corr, np.nan)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a1.imshow(corr, vmin=0, vmax=1, cmap="magma")
    fig.colorbar(im, ax=a1, fraction=0.046)
    a1.set_title("|corr| between dimensions of the users' components", fontsize=9)
    a2.hist(corr[np.triu_indices(run.D, k=1)], bins=40, color="#4477aa")
    a2.set(xlabel="|corr| of a pair of dimensions", ylabel="pairs")
    fig.tight_layout()
    score = independence(mu)
    return (f"<section id='micro'><h2>Micro disentanglement</h2>{_img(fig, 'correlation between dimensions')}"
            f"<p>Independence (Sec. 3.4: 1 − mean |corr| over pairs of dimensions) of {len(rows):,} test users' "
            f"components: <b>{score:.3f}</b>. Each dimension of a component is meant to be one factor a user can "
            "steer; a dark matrix means the dimensions vary independently.</p></section>")


def _traversals(run: Run, items: pl.DataFrame, concept: np.ndarray, n: int) -> str:
    counts = items["train_count"].to_numpy() if "train_count" in items.columns else np.ones(len(items))
    blocks = []
    for start in np.argsort(-counts)[:n]:  # the most popular items, each along the dimension of h it leans on most
        dim = int(np.argmax(np.abs(run.h[start])))
        t = traversal(run, dim=dim, item=str(items["item_id"][int(start)]), steps=6)
        steps = "".join(f"<li><code>{s['value']:+.3f}</code> {html.escape(s['item'])}</li>" for s in t["steps"])
        blocks.append(f"<div class='traversal'><h3>{html.escape(t['from'])}: dimension {t['dimension']}, "
                      f"concept {t['concept']}</h3><ol>{steps}</ol></div>")
    return f"<section id='traversals'><h2>Example traversals</h2>{''.join(blocks)}</section>"


def _curve(lake_root: str, run_name: str) -> str:
    png = lake.read_bytes(lake.join(layout.run_uri(lake_root, run_name), "learning_curve.png"))
    return (f"<section id='curve'><h2>Learning curve</h2><img alt='learning curve' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'></section>")


def _img(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.grid{display:grid;"
             "grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}.concept,.traversal{background:#f6f6f6;"
             "padding:6px 12px;border-radius:6px}img{max-width:100%}small{color:#666}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>macrid run {html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>macrid run {html.escape(title)}</h1>{body}</body></html>")


def write(lake_root: str, run_name: str) -> str:
    """Build the report and write it to <lake>/runs/<run>/report.html; returns its URI."""
    uri = lake.join(layout.run_uri(lake_root, run_name), "report.html")
    lake.write_bytes(uri, build(lake_root, run_name).encode())
    return uri


