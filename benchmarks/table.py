"""Print Table-1-shaped markdown rows from run folders' metrics.json (test users, mean ± SE).

  python benchmarks/table.py lake/runs/ml-1m-ease lake/runs/ml-1m-macridvae-best ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    t = m["test"]
    cells = [f"{t[k][0]:.4f} ± {t[k][1]:.4f}" for k in ("ndcg@100", "recall@20", "recall@50")]
    val = f"{m['val']['ndcg@100'][0]:.4f}"
    ind = f"{t['independence']:.3f}" if "independence" in t else "–"
    extra = f"epoch {m['best_epoch']}/{m['epochs_run']}" if "best_epoch" in m else f"λ={m.get('lam', '–')}"
    return f"| {m['dataset']} | {m['model']} | {' | '.join(cells)} | {val} | {ind} | {extra} |"


if __name__ == "__main__":
    print("| dataset | method | NDCG@100 | Recall@20 | Recall@50 | val NDCG@100 | independence | selected |")
    print("|---|---|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        print(row(Path(arg)))
