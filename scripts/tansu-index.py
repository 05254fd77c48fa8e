#!/usr/bin/env python3
"""Add the index tansu 0.6.0's sqlite schema lacks, to a running broker's database.

tansu fetches each record's headers with a join on header(topition, offset_id), a column pair
its schema does not index: every fetched record scans the whole header table, so a broker
slows down with every message it has stored (seen here: 2,000 messages/s fell ~10 s behind
within 10 s; sqlite table scans at 100 % of a core). An index changes no result, only the
plan. Used by scripts/stack and the tests' private brokers.

    scripts/tansu-index.py PATH/tansu.db
"""
import sqlite3
import sys
import time

db = sys.argv[1]
deadline = time.time() + 30
while True:
    try:
        conn = sqlite3.connect(db, timeout=10)
        exists = conn.execute(
            "select 1 from sqlite_master where type = 'table' and name = 'header'"
        ).fetchone()
        if exists:
            conn.execute(
                "create index if not exists rtinval_header_record on header (topition, offset_id)"
            )
            conn.commit()
            conn.close()
            break
        conn.close()
    except sqlite3.OperationalError as e:  # locked, or the file is being created
        last = e
    if time.time() > deadline:
        sys.exit(f"tansu-index: {db} has no header table after 30 s; is tansu running?")
    time.sleep(0.1)
