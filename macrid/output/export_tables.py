"""The export's tables: each one's columns, written once (`schema_of`), and the builders that fill them.

Every builder names its columns from `schema_of`, and every commit checks the data files' types against it
(`delta.check_schema`), so a column added, renamed or retyped here is the one every file and every commit
sees (docs/export-schema.md describes them for readers).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 2  # 2: recommendations.rank is int32 (1: int16; such tables are widened on the next export)
TABLES = ("user_components", "recommendations", "item_concepts", "prototypes")


def schema_of(table: str, item_type: pa.DataType | None = None, user_type: pa.DataType | None = None,
              item_bias: bool = False) -> pa.Schema:
    """The columns of one export table. item_type / user_type: the ID types of the run's vocabulary and of
    the input's users (only the tables that hold them need them); item_bias: the model has b_i, which
    item_concepts then carries as `bias` (only then: older tables keep their columns)."""
    vec = pa.list_(pa.float32())
    if table == "user_components":
        fields = [("user_id", user_type), ("component", pa.int16()), ("weight", pa.float32()),
                  ("dominant", pa.bool_()), ("mu", vec)]
    elif table == "recommendations":
        fields = [("user_id", user_type), ("rank", pa.int32()), ("item_id", item_type), ("score", pa.float32()),
                  ("concept", pa.int16())]
    elif table == "item_concepts":
        fields = [("item_id", item_type), ("title", pa.string()), ("concept", pa.int16()),
                  ("probability", pa.float32()), ("probabilities", vec), ("h", vec)]
        fields += [("bias", pa.float32())] if item_bias else []
    elif table == "prototypes":
        fields = [("concept", pa.int16()), ("m", vec), ("items", pa.int64())]
    else:
        raise ValueError(f"no export table {table!r} (tables: {TABLES})")
    return pa.schema(fields)


def schemas_of(item_type: pa.DataType, user_type: pa.DataType, top_n: int, item_bias: bool) -> dict[str, pa.Schema]:
    """The tables one export writes (recommendations only with top_n > 0), each with its columns."""
    return {t: schema_of(t, item_type, user_type, item_bias) for t in TABLES if t != "recommendations" or top_n}


def columns_of(table: str) -> list[str]:
    """The column names of one export table, in order (the builders' names)."""
    return schema_of(table, pa.null(), pa.null(), item_bias=True).names


def components_table(user_ids: pa.Array, mu: torch.Tensor, share: torch.Tensor) -> pa.Table:
    """One row per (user, component): user_id, component, weight (the user's share of the concept), dominant,
    mu. user_ids (B,), mu (B, K, D), share (B, K)."""
    B, K, D = mu.shape
    share_np = share.float().cpu().numpy()  # (B, K)
    dominant = share_np.argmax(1)  # (B,)
    flat = mu.float().cpu().numpy().reshape(-1)  # (B*K*D,)
    user_ids = pa.array(user_ids)
    return pa.Table.from_arrays([
        user_ids.take(pa.array(np.repeat(np.arange(B), K))),
        pa.array(np.tile(np.arange(K, dtype=np.int16), B)),
        pa.array(share_np.reshape(-1)),
        pa.array(np.tile(np.arange(K), B) == np.repeat(dominant, K)),
        pa.ListArray.from_arrays(pa.array(np.arange(0, B * K * D + 1, D, dtype=np.int32)), pa.array(flat)),
    ], names=columns_of("user_components"))


def recommendations_table(user_ids: pa.Array, item_ids: pa.Array, out) -> pa.Table:
    """One row per (user, rank): user_id, rank (1 = best), item_id, score (log A_ui), concept.
    out: represent.users' top-N, (B, N) each; a user's own items are never recommended (top_valid)."""
    B, N = out.top_items.shape
    keep = out.top_valid.cpu().numpy().reshape(-1)  # (B*N,)
    user_ids = pa.array(user_ids)
    return pa.Table.from_arrays([
        user_ids.take(pa.array(np.repeat(np.arange(B), N)[keep])),
        pa.array(np.tile(np.arange(1, N + 1, dtype=np.int32), B)[keep]),
        item_ids.take(pa.array(out.top_items.cpu().numpy().reshape(-1)[keep])),
        pa.array(out.top_scores.float().cpu().numpy().reshape(-1)[keep]),
        pa.array(out.top_concepts.cpu().numpy().reshape(-1).astype(np.int16)[keep]),
    ], names=columns_of("recommendations"))


def item_concepts_table(item_ids: pa.Array, titles: pa.Array, concept: np.ndarray, c: np.ndarray, h: np.ndarray,
                        bias: np.ndarray | None) -> pa.Table:
    """One row per item of a chunk: concept (the mode), its probability, every c_ik, h_i, and b_i when the model
    has it. concept (C,), c (C, K), h (C, D), bias (C,) or None."""
    columns = [item_ids, titles, pa.array(concept.astype(np.int16)), pa.array(c.max(1)), list_column(c),
               list_column(h)]
    if bias is not None:
        columns.append(pa.array(bias))
    return pa.Table.from_arrays(columns, names=columns_of("item_concepts")[:len(columns)])


def prototypes_table(m: np.ndarray, per_concept: np.ndarray) -> pa.Table:
    """One row per concept: m_k (K, D) and how many items have it as their mode (K,)."""
    K = len(m)
    return pa.Table.from_arrays([pa.array(np.arange(K, dtype=np.int16)), list_column(m), pa.array(per_concept)],
                                names=columns_of("prototypes"))


def list_column(x: np.ndarray) -> pa.ListArray:
    """(R, C) float32 -> list<float32> column of R rows."""
    R, C = x.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, R * C + 1, C, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1)))
