"""The metadata store's own small contracts (the rest is covered through LayerStore)."""

from __future__ import annotations

from pathlib import Path

from layerfs.metastore import DriverState, MetaStore


def test_driver_state_prefix_is_literal_and_case_sensitive(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "meta.db")
    try:
        state = DriverState(store, "devicemapper")
        for key in ("device:ab", "device:AB", "device_x", "devicex:1", "device%y", "deleted:ab"):
            state.set(key, key)
        DriverState(store, "other").set("device:ab", "not mine")
        assert set(state.items("device:")) == {"device:ab", "device:AB"}
        assert set(state.items("device:a")) == {"device:ab"}
        assert set(state.items("device_")) == {"device_x"}
        assert set(state.items("device%")) == {"device%y"}
        assert len(state.items("")) == 6
        assert state.items("device:ab") == {"device:ab": "device:ab"}
    finally:
        store.close()
