"""circuit-tracer 0.5.0's own checks of a graph file, and its local viewer,
for tc_explore's tests. Runs in circuit-tracer's environment
(``scripts/make_circuit_tracer_env.sh``), never imports tc_explore.

    .ctvenv/bin/python scripts/circuit_tracer_viewer.py validate FILE.json...
    .ctvenv/bin/python scripts/circuit_tracer_viewer.py serve DATA_DIR PORT

``validate`` parses each file with circuit-tracer's pydantic graph model
(``circuit_tracer.frontend.graph_models.Model``) and prints one JSON line per
file: the number of nodes and links, of distinct node ids, of distinct
``(layer, feature, ctx_idx)`` keys (the viewer merges nodes sharing one), and
the links whose ends are not nodes. ``serve`` starts circuit-tracer's
``frontend.local_server.serve`` on DATA_DIR (graph files plus
``graph-metadata.json``, which it first brings up to date with every graph
file there, as ``create_graph_files`` does), prints ``ready``, and serves until its standard
input closes.
"""
from __future__ import annotations

import json
import sys


def validate(paths: list[str]) -> None:
    from circuit_tracer.frontend.graph_models import Model
    for path in paths:
        with open(path, encoding="utf-8") as f:
            graph = Model.model_validate_json(f.read())
        ids = [n.node_id for n in graph.nodes]
        keys = {(n.layer, n.feature, n.ctx_idx) for n in graph.nodes}
        dangling = [link for link in graph.links
                    if link["source"] not in set(ids) or link["target"] not in set(ids)]
        print(json.dumps({"path": path, "nodes": len(ids), "links": len(graph.links),
                          "unique_ids": len(set(ids)), "unique_keys": len(keys),
                          "dangling_links": len(dangling), "slug": graph.metadata.slug}), flush=True)


def serve(data_dir: str, port: int) -> None:
    import glob
    import os

    from circuit_tracer.frontend.local_server import serve as start
    from circuit_tracer.frontend.utils import add_graph_metadata
    # list every graph file in graph-metadata.json, as create_graph_files does
    for path in sorted(glob.glob(os.path.join(data_dir, "*.json"))):
        if os.path.basename(path) != "graph-metadata.json":
            with open(path, encoding="utf-8") as f:
                add_graph_metadata(json.load(f)["metadata"], data_dir)
    server = start(data_dir=data_dir, port=port)
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "validate":
        validate(sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
