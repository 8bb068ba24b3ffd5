"""Two simulated nodes on one machine (`torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1`, rendezvous on
127.0.0.1) sharing one output directory, as multi-node runs on a shared filesystem do: both nodes end with the same
posterior, and each file of the plugin's (posteriors of the run and of every checkpoint, calibration reports) has
exactly one writer, global rank 0, although every node has a local rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import assert_identical_tensors, base_config, free_port, subprocess_env

pytestmark = pytest.mark.slow
PLUGIN_FILES = ("blob_posterior.safetensors", "blob_config.json")


def node_command(node_rank: int, port: int, config: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "axolotl.cli.train", str(config),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir, completion_data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("two-nodes")
    out, port, nodes = workdir / "out", free_port(), []
    for node in (0, 1):
        config = base_config(
            tiny_model_dir, completion_data, out, max_steps=4, save_steps=2, eval_steps=2, ddp_backend="gloo",
            dataset_prepared_path=str(workdir / f"prepared-node{node}"),  # each node's own disk; the outputs are shared
            calibration={"mode": "tokens", "plots": False},
            plugins=["axolotl_blob.BlobPlugin", "probe.ProbePlugin", "write_audit.WriteAuditPlugin"],
        )  # fmt: skip
        path = workdir / f"node{node}.yml"
        path.write_text(yaml.safe_dump(config))
        log = (workdir / f"node{node}.log").open("w")
        nodes.append(subprocess.Popen(node_command(node, port, path), cwd=workdir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=900) for node in nodes]
    assert codes == [0, 0], "\n".join((workdir / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    return out


def test_both_nodes_end_with_the_same_posterior(two_nodes):
    node0, node1 = (load_file(two_nodes / f"rank{rank}_adapter.safetensors") for rank in (0, 1))
    assert any("blob_G" in key for key in node0)
    assert_identical_tensors(node1, node0)
    saved = load_file(two_nodes / "blob_posterior.safetensors")
    mine = {key.removeprefix("base_model.model.").removesuffix(".default"): t for key, t in node0.items() if "blob_G" in key}
    assert_identical_tensors(saved, mine)


def test_every_plugin_file_has_one_writer_global_rank_0(two_nodes):
    writes = {rank: set(json.loads((two_nodes / f"writes-rank{rank}.json").read_text())) for rank in (0, 1)}
    plugin_files = {str(p.resolve()) for p in two_nodes.rglob("*") if p.name in PLUGIN_FILES or p.parent.name == "calibration"}
    assert {str(two_nodes.resolve() / "blob_posterior.safetensors"), str(two_nodes.resolve() / "checkpoint-2" / "blob_posterior.safetensors")} <= plugin_files
    assert any("calibration" in path for path in plugin_files)
    assert plugin_files <= writes[0]  # every one written by global rank 0 …
    assert not plugin_files & writes[1]  # … and none by the other node's local rank 0
