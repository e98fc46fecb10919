"""Prints the event ids in a running sidecar's store, one per line (run inside its container).

Opens the LMDB environment read-only beside the daemon (LMDB allows readers in
other processes), so the store is read as it is, not through an API that
might filter or page it.
"""

import sys

import lmdb
from atlas_sidecar_client.pb import events_pb2

from sidecar.store import DB_NAMES, decode_log_value

path = sys.argv[1] if len(sys.argv) > 1 else "/var/lib/atlas-sidecar/store/lmdb"
env = lmdb.open(path, readonly=True, lock=True, subdir=True, max_dbs=len(DB_NAMES) + 8)
try:
    events = env.open_db(b"events", create=False)
    with env.begin() as txn:
        for _key, value in txn.cursor(db=events):
            ev = events_pb2.Event()
            ev.ParseFromString(decode_log_value(value)[1])
            print(ev.event_id)
finally:
    env.close()
