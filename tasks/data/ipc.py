"""Arrow tables as IPC stream bytes: how tables cross the Ray boundary in job payloads (plain bytes, picklable)."""
from __future__ import annotations

import pyarrow as pa

__all__ = ["table_from_ipc", "table_to_ipc"]


def table_from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()
