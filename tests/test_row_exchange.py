"""allreduce_rows on 2 real gloo ranks: equal to a dense all-reduce, and every tensor on the worker's device
(the virtual accelerator of device_guard.py)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

M, D, WORLD = 50, 6, 2


def _rank(rank: int, init: str, out: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from device_guard import VIRTUAL, VirtualAccelerator, on_virtual

    from macrid.training.row_exchange import allreduce_rows

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(rank)
    n_rows = 7 + 5 * rank  # ranks touch different numbers of rows: the padding path runs
    ids = torch.randint(0, M, (n_rows,), generator=g)  # repeats within a rank: coalesce sums them
    vals = torch.randn(n_rows, D, generator=g)
    dense = torch.zeros(M, D).index_add_(0, ids, vals)  # the same gradient, dense
    with VirtualAccelerator():
        sparse = torch.sparse_coo_tensor(ids.unsqueeze(0).to(VIRTUAL), vals.to(VIRTUAL), (M, D))
        got, received = allreduce_rows(sparse, WORLD)
        assert on_virtual(got)
        got = got.to_dense().cpu()
    dist.all_reduce(dense)
    torch.save({"got": got, "want": dense / WORLD, "received": received}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_allreduce_rows_equals_a_dense_all_reduce_on_two_gloo_ranks(tmp_path):
    init = f"file://{tmp_path}/store"
    mp.start_processes(_rank, args=(init, str(tmp_path / "r")), nprocs=WORLD, start_method="spawn")
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"r.{rank}")
        assert torch.allclose(res["got"], res["want"], atol=1e-6)
        distinct_max = 12  # rank 1's 12 draws bound its distinct rows; received = W * n_max * (8 + 4 D) bytes
        assert res["received"] <= WORLD * distinct_max * (8 + 4 * D) and res["received"] > 0
