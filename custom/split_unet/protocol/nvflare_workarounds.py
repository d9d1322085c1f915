"""Work-arounds of measured NVFlare 2.9 defects, applied by the server's controller and each site's executor when
their process starts. Each names the defect, what it costs, and the test that notices when NVFlare fixes it."""

from __future__ import annotations

from nvflare.fuel.utils.buffer_list import ConsumableBufferList


def _buffers_summary(buffers: ConsumableBufferList) -> str:
    return f"<{type(buffers).__name__}: {len(buffers)} buffers, {sum(len(b) for b in buffers)} bytes>"


def short_received_buffer_repr() -> None:
    """Make the repr of a received message's chunks a one-line summary.

    NVFlare 2.9's ``Adapter.call`` (``nvflare/fuel/f3/cellnet/cell.py``) builds ``f"... incoming data={result}"``
    for a debug line on every streamed request it receives, whatever the log level. ``result`` is the received
    ``ConsumableBufferList``, a ``list`` of the payload's chunks, so the f-string is the repr of every byte of the
    message: 118 ms of CPU and a 33 MB string for one site's 11 MB of activations (``docs/performance/wire.md``),
    paid by the server for every site at every step. A job cannot set NVFlare's log level low enough to skip an
    f-string; the class's repr, used by nothing but such log lines, is what this process can change.
    (``tests/test_metrics_and_wire.py`` fails once NVFlare stops formatting the payload: then remove this.)
    """
    ConsumableBufferList.__repr__ = _buffers_summary
