"""A torchrun worker for tests/test_serve_offline.py: the service's offline batch mode over however many
processes torchrun started. Every rank writes what it analysed and what analyze_files returned to
``REPORT_PREFIX-<rank>.json`` (rank 0 alone writes OUT, inside analyze_files).

Usage: torchrun --standalone --nproc_per_node=N tests/serve_offline_worker.py CONFIG.json FILES.txt OUT SUBMITTER REPORT_PREFIX

CONFIG.json is medadv.serve.app.config_to_json's; FILES.txt has one path a line. Positional arguments only
(none that torchrun could take for one of its own options).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    config_file, files_file, out, submitter, report = sys.argv[1:6]
    torch.set_num_threads(1)  # the arithmetic of the one-process reference, which runs with one thread
    from medadv import dist
    from medadv.serve import offline
    from medadv.serve.analysis import Limits, ScreenConfig
    from medadv.serve.app import ServiceConfig

    d = json.loads(Path(config_file).read_text())
    d.pop("threads", None)
    d["model"] = Path(d["model"])
    d["limits"], d["screen"] = Limits(**d["limits"]), ScreenConfig(**d["screen"])
    config = ServiceConfig(**d)
    files = [Path(line) for line in Path(files_file).read_text().splitlines() if line]

    shard = dist.init_from_env("cpu")
    mine: list[int] = []
    analyse = offline._Analyst.analyse

    def recorded(self, jobs):  # which files this rank analysed
        mine.extend(j for j, _ in jobs)
        return analyse(self, jobs)

    offline._Analyst.analyse = recorded
    record = offline.analyze_files(config, files, Path(out), submitter=submitter, step=2)
    Path(f"{report}-{shard.rank}.json").write_text(json.dumps({"rank": shard.rank, "world_size": shard.world_size,
                                                               "indices": mine, "record": record}))
    dist.shutdown()


if __name__ == "__main__":
    main()
