"""The driver's own records, kept in the layer store (``DriverState``, sqlite).

Docker kept one JSON file per device plus a ``transaction-metadata`` file under
``devicemapper/metadata/``; here the same facts are rows of the layer store's
``driver_state`` table, so they commit atomically with each other::

    pool                 {"setup": {...}, "name", "prefix", "vg", "lv", "created"}
    base                 DeviceRecord of the base device (layer "")
    device:<layer id>    DeviceRecord of each layer's thin device
    deleted:<dev id>     a device whose layer is gone but whose blocks are not yet
                         freed (deferred deletion); its id stays reserved
    next_device_id       where the search for a free 24-bit thin id starts
    transaction_id       the pool transaction id the records correspond to
    txn                  the open transaction, if any: {"id", "dev_id", "layer"}

Making a device is a transaction (Docker's protocol): ``txn`` is written
*before* the ``create_thin``/``create_snap`` message, the device's record
after it, then the pool's transaction id is moved to ``txn.id`` by a
``set_transaction_id`` message, and only then ``txn`` is cleared. Opening a
root with a ``txn`` left behind compares the pool's transaction id with
``txn.id``: lower means the pool never committed the device -- it is deleted
(if the message got that far) with its record; equal means it is complete.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import asdict, dataclass
from typing import Any

from layerfs.metastore import DriverState

BASE = ""  # the base device's "layer id"


@dataclass(frozen=True)
class DeviceRecord:
    """One thin device: which id in the pool, its dm name and virtual size."""

    layer: str  # layer id; BASE for the base device
    dev_id: int
    name: str  # dm name: /dev/mapper/<name>
    size: int  # bytes (the thin target's length)
    origin: int | None = None  # dev id it was snapshotted from (None: create_thin)
    initialized: bool = True  # base device: formatted
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceRecord:
        return cls(**data)


@dataclass(frozen=True)
class Transaction:
    id: int  # the pool transaction id this transaction moves to
    dev_id: int
    layer: str  # BASE for the base device


class Metadata:
    """Typed access to the driver's rows in the layer store."""

    def __init__(self, state: DriverState) -> None:
        self.state = state

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A store transaction: the rows written inside commit together."""
        return self.state.transaction()

    # --- pool -------------------------------------------------------------------------------
    def pool(self) -> dict[str, Any] | None:
        value = self.state.get("pool")
        return dict(value) if value else None

    def set_pool(self, record: dict[str, Any]) -> None:
        self.state.set("pool", record)

    def forget_everything(self) -> None:
        """Drop every record (after the pool was destroyed)."""
        with self.transaction():
            for key in self.state.items(""):
                self.state.delete(key)

    # --- devices ----------------------------------------------------------------------------
    @staticmethod
    def _key(layer: str) -> str:
        return "base" if layer == BASE else f"device:{layer}"

    def device(self, layer: str) -> DeviceRecord | None:
        value = self.state.get(self._key(layer))
        return DeviceRecord.from_dict(value) if value else None

    def base(self) -> DeviceRecord | None:
        return self.device(BASE)

    def put_device(self, rec: DeviceRecord) -> None:
        self.state.set(self._key(rec.layer), rec.as_dict())

    def delete_device(self, layer: str) -> None:
        self.state.delete(self._key(layer))

    def devices(self) -> dict[str, DeviceRecord]:
        """Layer devices by layer id (not the base)."""
        return {key.removeprefix("device:"): DeviceRecord.from_dict(value)
                for key, value in self.state.items("device:").items()
                if key.startswith("device:")}

    # --- deferred deletions -----------------------------------------------------------------
    def deleted(self) -> dict[int, dict[str, Any]]:
        return {int(key.removeprefix("deleted:")): value
                for key, value in self.state.items("deleted:").items()
                if key.startswith("deleted:")}

    def mark_deleted(self, rec: DeviceRecord) -> None:
        """The layer is gone; its device still holds blocks until it can be deleted."""
        with self.transaction():
            self.state.set(f"deleted:{rec.dev_id}", {"dev_id": rec.dev_id, "name": rec.name,
                                                     "layer": rec.layer, "since": time.time()})
            self.delete_device(rec.layer)

    def forget_deleted(self, dev_id: int) -> None:
        self.state.delete(f"deleted:{dev_id}")

    def used_ids(self) -> set[int]:
        ids = {rec.dev_id for rec in self.devices().values()}
        ids |= set(self.deleted())
        base = self.base()
        if base is not None:
            ids.add(base.dev_id)
        txn = self.txn()
        if txn is not None:
            ids.add(txn.dev_id)
        return ids

    # --- transactions -----------------------------------------------------------------------
    def next_device_id(self) -> int:
        return int(self.state.get("next_device_id", 1))

    def transaction_id(self) -> int:
        return int(self.state.get("transaction_id", 0))

    def txn(self) -> Transaction | None:
        value = self.state.get("txn")
        return Transaction(**value) if value else None

    def open_txn(self, txn: Transaction, next_id: int) -> None:
        with self.transaction():
            self.state.set("txn", asdict(txn))
            self.state.set("next_device_id", next_id)

    def close_txn(self, transaction_id: int) -> None:
        with self.transaction():
            self.state.set("transaction_id", transaction_id)
            self.state.delete("txn")

    def rollback_txn(self, txn: Transaction) -> None:
        """Forget a transaction the pool never committed, and its device's record."""
        with self.transaction():
            rec = self.device(txn.layer)
            if rec is not None and rec.dev_id == txn.dev_id:
                self.delete_device(txn.layer)
            self.state.delete("txn")
