"""A filter for the tests that changes nothing and logs every payload it sees: the party, the task, the direction and
the DXO's filter history (the filters before it that changed the payload), one JSON line per payload in the party's
run folder. Placed in a chain, it proves the chain ran on that payload."""

import json
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

LOG_FILE = "filter_log.jsonl"


class FilterLog(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO (an error reply)
            return shareable
        peer = fl_ctx.get_peer_context()
        entry = {"party": fl_ctx.get_identity_name(), "peer": peer.get_identity_name() if peer else None,
                 "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                 "direction": fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION),
                 "kind": dxo.data_kind, "step": (dxo.meta or {}).get("step"), "tensors": bool(dxo.data),
                 "history": dxo.get_filter_history() or []}
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with open(run_dir / LOG_FILE, "a") as log:
            log.write(json.dumps(entry) + "\n")
        return shareable
