"""Under torch.distributed, RemoteDataset takes rank and world size from the process group."""

from __future__ import annotations

from _gloo import run_gloo_job
from _serverproc import ServerProcess
from torch.utils.data import DistributedSampler

LENGTH = 103  # the core config's "dict" dataset

# One rank of a job started as torchrun starts it (env:// rendezvous): no rank arguments.
RANK_SCRIPT = """
import json, sys, warnings
import torch.distributed as dist
from batchwire.client import RemoteDataset

dist.init_process_group("gloo")
target = sys.argv[1]
ds = RemoteDataset(target, "dict", batch_size=4, shuffle=True, seed=3)
indices = [i for batch in ds for i in batch["index"].tolist()]
state = ds.state_dict()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    explicit = RemoteDataset(target, "dict", batch_size=4, rank=0, world_size=1)
    shards = (explicit.rank, explicit.world_size, len(explicit), explicit.state_dict()["config"])
print(json.dumps({
    "rank": dist.get_rank(), "len": len(ds), "batches": -(-len(indices) // 4),
    "indices": indices, "config": state["config"],
    "explicit": shards[:3], "explicit_config": shards[3],
    "warnings": [str(w.message) for w in caught],
}))
dist.barrier()
dist.destroy_process_group()
"""


def test_a_torchrun_job_without_rank_arguments_splits_the_epoch(core_server: ServerProcess):
    results = run_gloo_job(RANK_SCRIPT, [core_server.target], world_size=2)
    shares = [r["indices"] for r in results]
    for rank, result in enumerate(results):
        sampler = DistributedSampler(range(LENGTH), num_replicas=2, rank=rank, shuffle=True, seed=3)
        assert result["indices"] == list(sampler), f"rank {rank}: not DistributedSampler's share"
        assert result["len"] == result["batches"] == 13
        assert (result["config"]["rank"], result["config"]["world_size"]) == (rank, 2)
        # Explicit arguments win, and the disagreement is said once, naming both.
        assert result["explicit"] == [0, 1, 26]
        assert (result["explicit_config"]["rank"], result["explicit_config"]["world_size"]) == (
            0,
            1,
        )
        assert len(result["warnings"]) == 1, result["warnings"]
        assert "rank=0, world_size=1" in result["warnings"][0]
        assert f"rank {rank} of world size 2" in result["warnings"][0]
    padding = 2 * -(-LENGTH // 2) - LENGTH
    assert set(shares[0]) | set(shares[1]) == set(range(LENGTH))
    assert len(set(shares[0]) & set(shares[1])) == padding
    assert len(shares[0]) + len(shares[1]) == LENGTH + padding
