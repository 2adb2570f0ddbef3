"""docs/engines.md shows the configuration the tests really use (layerfs_bench.engine_peers)."""

from __future__ import annotations

import re
from pathlib import Path

from layerfs_bench.engine_peers import CriConfig, config_toml

DOC = Path(__file__).resolve().parents[2] / "docs" / "engines.md"


def block(tag: str) -> list[str]:
    match = re.search(rf"^```toml {tag}\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"no ```toml {tag} block in {DOC.name}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_the_documented_containerd_config_is_the_one_the_tests_write() -> None:
    written = config_toml(Path("/var/lib/containerd"),
                          {"layerfs-overlay2": Path("/run/layerfs/overlay2-snapshots.sock")},
                          CriConfig(snapshotter="layerfs-overlay2",
                                    sandbox_image="registry.k8s.io/pause:3.6",
                                    cni_bin_dir="/usr/lib/cni", cni_conf_dir="/etc/cni/net.d"))
    lines = written.splitlines()
    for tag in ("containerd", "containerd-cri"):
        documented = block(tag)
        missing = [line for line in documented if line not in lines]
        assert not missing, f"```toml {tag}: not what the tests write: {missing}\n{written}"
        # ...and in the same order.
        assert [line for line in lines if line in documented] == documented
