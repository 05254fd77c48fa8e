//! Proves the producer's own row decoder (`TableShape::rows`: column facts read once per table
//! map) yields exactly what mysql_common's row iterator yields (through `TableShape::values`),
//! on real binlog events of MariaDB for every column type a RackTables-like schema uses, with
//! NULLs, extremes, multi-byte text, binary values with trailing zero bytes, inserts, updates
//! and deletes. Needs `scripts/stack up`. (Not negative TIME values with fractions: mysql_common
//! 0.37.3 subtracts past zero decoding them, whichever path calls it — a panic in debug builds.)
//! Run alone: `cargo test -p rtinval-tests --test decoder_equivalence`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::time::Duration;

use futures::StreamExt;
use mysql_async::binlog::events::EventData;
use mysql_async::prelude::Queryable;
use rtinval_producer::decode::{RowImages, TableShape};
use rtinval_tests::{Stack, TestDb, server_id};

const TABLE: &str = "CREATE TABLE T (
  id INT UNSIGNED NOT NULL PRIMARY KEY,
  ti TINYINT, tu TINYINT UNSIGNED, si SMALLINT, su SMALLINT UNSIGNED,
  mi MEDIUMINT, mu MEDIUMINT UNSIGNED, bi BIGINT, bu BIGINT UNSIGNED,
  f FLOAT, d DOUBLE, dec1 DECIMAL(12,4), dec2 DECIMAL(30,10) UNSIGNED,
  dt DATE, dtm DATETIME, dtm6 DATETIME(6), ts TIMESTAMP(3) NULL, tm TIME(2), yr YEAR,
  c CHAR(10), vc VARCHAR(300), utf VARCHAR(20) CHARACTER SET utf8mb4,
  bn BINARY(16), vb VARBINARY(40), tx TEXT, bl BLOB, mt MEDIUMTEXT,
  en ENUM('object','rack','row','location'), st SET('a','b','c'), bt BIT(10),
  js JSON
) ENGINE=InnoDB";

fn row(i: u32) -> String {
    if i.is_multiple_of(7) {
        // Every nullable column NULL.
        return format!(
            "({i}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
             NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
             NULL, NULL, NULL)"
        );
    }
    let n = i64::from(i);
    let dec1 = format!("-{}.{:04}", n * 11, n % 10_000);
    let dec2 = format!("{}.{:010}", n * 999_999_937, n);
    format!(
        "({i}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, \
         '2026-{:02}-{:02}', '1999-12-31 23:59:{:02}', '2026-11-27 00:00:00.{:06}', \
         '2026-01-01 00:00:01.{:03}', '{:02}:30:15.25', {}, \
         'c{i}', REPEAT('v', {}), 'Zürich-{i}-日本', \
         UNHEX('20010db8{:08x}0000000000000000'), UNHEX('{:06x}00'), REPEAT('t', {}), \
         UNHEX('00ff{:04x}'), REPEAT('m', {}), {}, '{}', b'{:010b}', '{{\"k\": {i}, \"a\": [1, \"x\"]}}')",
        -128 + (n % 256),
        n % 256,
        -32768 + n * 37 % 65536,
        n * 37 % 65536,
        -8_388_608 + n * 1001 % 16_777_216,
        n * 1001 % 16_777_216,
        i64::MIN + n,
        if i.is_multiple_of(3) {
            "18446744073709551615".to_owned()
        } else {
            (n * 1_000_003).to_string()
        },
        n as f64 / 3.0,
        -(n as f64) * 1e300 / 7.0,
        dec1,
        dec2,
        n % 12 + 1,
        n % 28 + 1,
        n % 60,
        n * 13 % 1_000_000,
        n % 1000,
        n % 800,
        1901 + n % 254,
        n % 300,
        i,
        n * 5 % 2000,
        n * 97,
        n * 311 % 65_536,
        n * 1000,
        if i.is_multiple_of(5) {
            "NULL".to_owned()
        } else {
            format!(
                "'{}'",
                ["object", "rack", "row", "location"][i as usize % 4]
            )
        },
        ["a", "b,c", "", "a,b,c"][i as usize % 4],
        n % 1024,
    )
}

async fn master_status(conn: &mut mysql_async::Conn) -> (String, u64) {
    let r: mysql_async::Row = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .unwrap()
        .unwrap();
    (r.get(0).unwrap(), r.get(1).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_decoders_agree_on_every_column_type() {
    let db = TestDb::create("decoder", TABLE).await;
    let mut conn = db.pool.get_conn().await.unwrap();
    let (file, pos) = master_status(&mut conn).await;
    let rows: Vec<String> = (1..=300).map(row).collect();
    conn.query_drop(format!("INSERT INTO T VALUES {}", rows.join(",\n")))
        .await
        .unwrap();
    conn.query_drop(
        "UPDATE T SET vc = CONCAT(vc, 'x'), bu = 7, en = 'rack', bn = UNHEX('ff000000000000000000000000000000'), \
         dtm6 = NULL, js = JSON_OBJECT('u', id) WHERE id % 2 = 0",
    )
    .await
    .unwrap();
    conn.query_drop("DELETE FROM T WHERE id % 3 = 0")
        .await
        .unwrap();
    let expected_rows = 300 + 150 + 100;
    let (end_file, end_pos) = master_status(&mut conn).await;
    drop(conn);

    let opts = mysql_async::Opts::from_url(&Stack::get().mysql_url).unwrap();
    let reader = mysql_async::Conn::new(opts).await.unwrap();
    let request = mysql_async::BinlogStreamRequest::new(server_id())
        .with_filename(file.as_bytes())
        .with_pos(pos)
        .with_non_blocking();
    let mut stream = reader.get_binlog_stream(request).await.unwrap();
    let mut compared = 0usize;
    let mut current = file.clone();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("binlog read")
    {
        let event = event.unwrap();
        let log_pos = u64::from(event.header().log_pos());
        match event.read_data().unwrap() {
            Some(EventData::RowsEvent(ev)) => {
                let Some(tme) = stream.get_tme(ev.table_id()) else {
                    continue;
                };
                if tme.database_name() != db.name.as_str() {
                    continue;
                }
                let shape = TableShape::from_table_map(tme).expect("column names in the table map");
                let ours: Vec<RowImages> = shape
                    .rows(&ev)
                    .expect("the shape's decoder applies")
                    .collect::<Result<_, _>>()
                    .unwrap();
                let theirs: Vec<RowImages> = ev
                    .rows(tme)
                    .map(|r| {
                        let (b, a) = r.unwrap();
                        (b.map(|r| shape.values(r)), a.map(|r| shape.values(r)))
                    })
                    .collect();
                assert_eq!(ours.len(), theirs.len());
                for (o, t) in ours.iter().zip(&theirs) {
                    assert_eq!(o, t, "columns {:?}", shape.names);
                }
                compared += ours.len();
            }
            // A rotate event's log_pos is a position in the file it closes: it must not be
            // compared with the end position in the next one.
            Some(EventData::RotateEvent(r)) if log_pos != 0 => {
                current = r.name().into_owned();
                continue;
            }
            _ => {}
        }
        if current == end_file && log_pos >= end_pos {
            break;
        }
    }
    assert_eq!(compared, expected_rows, "every row change was compared");
}
