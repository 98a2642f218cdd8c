"""Reader process for bench_stream.py: follow one stream, print the delay of each item.

Usage: stream_reader.py DATABASE_URL durapipe|dbos WORKFLOW_ID COUNT
Prints READY once connected, then one JSON list of seconds (receive time - write time).
"""

from __future__ import annotations

import json
import sys
import time

url, mode, workflow_id, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
delays: list[float] = []
if mode == "durapipe":
    from durapipe.engine.eventread import EventReader, EventType

    with EventReader(url) as reader:
        reader.read(workflow_id)  # connected
        print("READY", flush=True)
        for event in reader.follow(workflow_id, idle=1.0):
            if event.type is EventType.NODE_FINISHED and event.name == "tick":
                delays.append(time.time() - event.at)  # written when the node ended
else:
    from dbos import DBOSClient
    from dbos._serialization import DBOSPortableJSONSerializer

    client = DBOSClient(system_database_url=url, serializer=DBOSPortableJSONSerializer(),
                        use_listen_notify=True)
    client.list_workflows(limit=1)  # connected
    print("READY", flush=True)
    while not client.list_workflows(workflow_ids=[workflow_id]):
        time.sleep(0.002)
    for value in client.read_stream(workflow_id, "ticks", polling_interval_sec=1.0):
        delays.append(time.time() - value["end"])
        if len(delays) == count:
            break
    client.destroy()
print(json.dumps(delays), flush=True)
