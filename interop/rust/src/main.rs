//! A snapbus pod in Rust, the upstream server's language: the wire contract with `apache-avro`
//! (its single-object writer and reader) and `rdkafka` (librdkafka, `partitioner=murmur2_random`).
//!
//! ```text
//! snapbus-interop-pod vectors FILE...               check every vector (exit 1 naming each difference)
//! snapbus-interop-pod publish BOOTSTRAP TOPIC OUT   publish sessions, update one, evict one; write OUT
//! snapbus-interop-pod read BOOTSTRAP TOPIC          print every record of the topic as a JSON line
//! snapbus-interop-pod redis-upstream URL_A URL_B TTL OUT
//!     the upstream's Valkey cache calls (`redis`, `rmp-serde`) against two Redis-protocol
//!     sidecars: write through A, read back through B; write OUT (exit 1 naming each difference)
//! ```

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use apache_avro::rabin::Rabin;
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::{AvroSchema, GenericSingleObjectReader, Schema, SpecificSingleObjectWriter};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redis::Commands;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use uuid::Uuid;

type Error = Box<dyn std::error::Error>;

/// A serializable point-in-time snapshot of a session workspace's metadata: the upstream
/// server's struct (dk-engine `workspace::cache::WorkspaceSnapshot`), field for field, with its
/// derives: `rmp_serde::to_vec_named` writes it as a map in this field order, the `Uuid`s as
/// 16-byte binaries (serde's non-human-readable form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceSnapshot {
    pub session_id: Uuid,
    pub repo_id: Uuid,
    pub agent_id: String,
    pub agent_name: String,
    pub changeset_id: Uuid,
    pub intent: String,
    pub base_commit: String,
    pub state: String,
    pub mode: String,
}

const SCHEMA: &str = include_str!("../../../schemas/workspace_snapshot.avsc");
const FIELDS: [&str; 9] = [
    "session_id", "repo_id", "agent_id", "agent_name", "changeset_id", "intent", "base_commit",
    "state", "mode",
];

impl AvroSchema for WorkspaceSnapshot {
    fn get_schema() -> Schema {
        Schema::parse_str(SCHEMA).expect("schemas/workspace_snapshot.avsc is a valid schema")
    }
}

struct Codec {
    writer: SpecificSingleObjectWriter<WorkspaceSnapshot>,
    reader: GenericSingleObjectReader,
}

/// The contract's fingerprint: CRC-64-AVRO of the Parsing Canonical Form, which (Avro
/// specification) keeps no `logicalType`. apache-avro 0.22 keeps it in its canonical form and
/// so fingerprints the schema as `c7155310b7520a36`, a schema no snapbus view knows: the
/// header is computed here from the schema without its logical types.
fn contract_header() -> Result<RabinFingerprintHeader, Error> {
    fn strip(node: &mut Json) {
        match node {
            Json::Object(map) => {
                map.remove("logicalType");
                map.values_mut().for_each(strip);
            }
            Json::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut raw: Json = serde_json::from_str(SCHEMA)?;
    strip(&mut raw);
    Ok(RabinFingerprintHeader::from_schema(&Schema::parse(&raw)?))
}

impl Codec {
    fn new() -> Result<Self, Error> {
        // human_readable: uuid::Uuid is then written as its text (the schema's string), not as
        // 16 bytes, which apache-avro 0.22 (default false) refuses for a string schema
        let writer = SpecificSingleObjectWriter::builder()
            .header(contract_header()?)
            .human_readable(true)
            .build();
        let reader = GenericSingleObjectReader::builder()
            .schema(WorkspaceSnapshot::get_schema())
            .header(contract_header()?.build_header())
            .human_readable(true)
            .build()?;
        Ok(Codec { writer, reader })
    }

    fn encode(&self, snapshot: &WorkspaceSnapshot) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.writer.write_ref(snapshot, &mut out)?;
        Ok(out)
    }

    fn decode(&self, value: &[u8]) -> Result<WorkspaceSnapshot, Error> {
        let mut cursor = value;
        let snapshot: WorkspaceSnapshot = self.reader.read_deser(&mut cursor)?;
        if !cursor.is_empty() {
            return Err(format!("{} trailing bytes after the record", cursor.len()).into());
        }
        Ok(snapshot)
    }
}

/// librdkafka's own `murmur2_random` partitioner (the one `partitioner=murmur2_random` selects).
fn murmur2_partition(key: &[u8], partitions: i32) -> i32 {
    // SAFETY: with a key, the partitioner only hashes the key bytes; it never reads the topic
    // or the opaques.
    unsafe {
        rdkafka::bindings::rd_kafka_msg_partitioner_murmur2_random(
            std::ptr::null(), key.as_ptr().cast(), key.len(), partitions,
            std::ptr::null_mut(), std::ptr::null_mut())
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, Error> {
    (0..text.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&text[i..i + 2], 16)?)).collect()
}

fn first_difference(actual: &[u8], expected: &[u8]) -> String {
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        if a != b {
            return format!("byte {i}: {a:02x} != expected {b:02x}");
        }
    }
    format!("length {} != expected {}", actual.len(), expected.len())
}

fn check_partitions(failures: &mut Vec<String>, entry: &Json, key: &[u8], what: &str) {
    for (count, expected) in entry["partition"].as_object().into_iter().flatten() {
        let n: i32 = count.parse().unwrap_or(0);
        let got = murmur2_partition(key, n);
        if Some(got as i64) != expected.as_i64() {
            failures.push(format!("{what}: partition of {n} is {got} != expected {expected}"));
        }
    }
}

fn vectors(files: &[String]) -> Result<bool, Error> {
    let codec = Codec::new()?;
    let fingerprint = hex(&contract_header()?.build_header()[2..]);
    let crate_fingerprint = hex(&WorkspaceSnapshot::get_schema().fingerprint::<Rabin>().bytes);
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in files {
        let doc: Json = serde_json::from_slice(&std::fs::read(file)?)?;
        let expected = doc["fingerprint"]["wire_hex"].as_str().unwrap_or_default();
        if fingerprint != expected {
            failures.push(format!("{file}: fingerprint {fingerprint} != expected {expected}"));
        }
        for vector in doc["snapshots"].as_array().into_iter().flatten() {
            let name = vector["name"].as_str().unwrap_or("?");
            let fields = &vector["snapshot"];
            let snapshot: WorkspaceSnapshot = serde_json::from_value(fields.clone())?;
            let key = snapshot.session_id.to_string().into_bytes();
            let (expected_key, expected_value) = (
                unhex(vector["key_hex"].as_str().unwrap_or_default())?,
                unhex(vector["value_hex"].as_str().unwrap_or_default())?,
            );
            if key != expected_key {
                failures.push(format!("{name}: key {}", first_difference(&key, &expected_key)));
            }
            match codec.decode(&expected_value) {
                Ok(decoded) => {
                    let decoded = serde_json::to_value(&decoded)?;
                    for field in FIELDS {
                        if decoded[field] != fields[field] {
                            failures.push(format!("{name}: field {field} decodes to {} != expected {}",
                                                  decoded[field], fields[field]));
                        }
                    }
                }
                Err(err) => failures.push(format!("{name}: the value does not decode: {err}")),
            }
            match codec.encode(&snapshot) {
                Ok(value) if value != expected_value => failures.push(format!(
                    "{name}: value {}", first_difference(&value, &expected_value))),
                Ok(_) => {}
                Err(err) => failures.push(format!("{name}: the snapshot does not encode: {err}")),
            }
            check_partitions(&mut failures, vector, &key, name);
            checked += 1;
        }
        for entry in doc["keys"].as_array().into_iter().flatten() {
            let key = entry["key"].as_str().unwrap_or_default();
            check_partitions(&mut failures, entry, key.as_bytes(), &format!("key {key}"));
            checked += 1;
        }
    }
    for failure in &failures {
        eprintln!("MISMATCH {failure}");
    }
    println!("{}", json!({"checked": checked, "failures": failures.len(), "fingerprint": fingerprint,
                          "apache_avro_own_fingerprint": crate_fingerprint}));
    Ok(failures.is_empty())
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// Collects delivery reports: (index of the record, partition, offset) or the error.
#[derive(Default)]
struct Deliveries(Mutex<Vec<Result<(usize, i32, i64), String>>>);

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<usize>) {
        let report = match result {
            Ok(message) => Ok((*index, message.partition(), message.offset())),
            Err((err, _)) => Err(format!("record {index}: {err}")),
        };
        self.0.lock().expect("not poisoned").push(report);
    }
}

fn session(intent: &str, agent: &str, state: &str, mode: &str) -> WorkspaceSnapshot {
    WorkspaceSnapshot {
        session_id: Uuid::new_v4(),
        repo_id: Uuid::new_v4(),
        agent_id: agent.into(),
        agent_name: "agent-rust".into(),
        changeset_id: Uuid::new_v4(),
        intent: intent.into(),
        base_commit: "0123456789abcdef0123456789abcdef01234567".into(),
        state: state.into(),
        mode: mode.into(),
    }
}

fn publish(bootstrap: &str, topic: &str, out: &str) -> Result<bool, Error> {
    let codec = Codec::new()?;
    let producer: BaseProducer<Deliveries> = client_config(bootstrap)
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("message.max.bytes", "1100000")
        .create_with_context(Deliveries::default())?;
    let timeout = Duration::from_secs(30);
    let metadata = producer.client().fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    let sessions = vec![
        session("written by the Rust pod", "user_rust", "active", "ephemeral"),
        session("", "", "", ""),
        session("répare ☕ 修复 🚀 \u{0} שלום", "usér_ß", "активен", "persistent"),
        session(&"long ".repeat(180_000), "user_rust", "submitted", "persistent"),
        session("to be evicted", "user_rust", "active", "ephemeral"),
    ];
    let mut writes = sessions.clone();
    writes.push(WorkspaceSnapshot { state: "merged".into(), ..sessions[0].clone() });
    let evicted = sessions[4].session_id.to_string();
    let mut records: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for snapshot in &writes {
        records.push((snapshot.session_id.to_string(), Some(codec.encode(snapshot)?)));
    }
    records.push((evicted.clone(), None));
    for (index, (key, value)) in records.iter().enumerate() {
        // one at a time: each record acked before the next, as a cache write would be
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(index)).key(key.as_str());
        if let Some(value) = value {
            record = record.payload(value.as_slice());
        }
        producer.send(record).map_err(|(err, _)| err)?;
        producer.flush(timeout)?;
    }
    let reports = std::mem::take(&mut *producer.context().0.lock().expect("not poisoned"));
    let mut placed = HashMap::new();
    for report in reports {
        let (index, partition, offset) = report?;
        placed.insert(index, (partition, offset));
    }
    let placement = |index: usize| placed.get(&index).copied().ok_or("a record was never acked");
    let mut published = Vec::new();
    for (index, snapshot) in writes.iter().enumerate() {
        let (partition, offset) = placement(index)?;
        published.push(json!({"snapshot": snapshot, "partition": partition, "offset": offset}));
    }
    let (partition, offset) = placement(writes.len())?;
    let (_, version) = rdkafka::util::get_rdkafka_version();
    let result = json!({
        "client": format!("librdkafka {version}"), "partitions": partitions, "published": published,
        "evicted": [{"session_id": evicted, "partition": partition, "offset": offset}],
    });
    std::fs::write(out, serde_json::to_vec(&result)?)?;
    Ok(true)
}

fn read(bootstrap: &str, topic: &str) -> Result<bool, Error> {
    let codec = Codec::new()?;
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "snapbus-interop-rust")
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "2000000")
        .create()?;
    let timeout = Duration::from_secs(30);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let count = metadata.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for partition in 0..count {
        let (_, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        remaining.insert(partition, high);
    }
    consumer.assign(&assignment)?;
    let mut next: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut bad = 0;
    while remaining.iter().any(|(p, high)| next.get(p).copied().unwrap_or(0) < *high) {
        if Instant::now() > deadline {
            return Err(format!("did not reach the end offsets {remaining:?} in 60 s").into());
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message?;
        next.insert(message.partition(), message.offset() + 1);
        let key = message.key().unwrap_or_default();
        let mut line = json!({
            "partition": message.partition(), "offset": message.offset(),
            "key": String::from_utf8_lossy(key), "default_partition": murmur2_partition(key, count),
        });
        match message.payload() {
            None => line["snapshot"] = Json::Null,
            Some(value) => match codec.decode(value) {
                Ok(snapshot) => line["snapshot"] = serde_json::to_value(&snapshot)?,
                Err(err) => {
                    line["error"] = json!(err.to_string());
                    bad += 1;
                }
            },
        }
        println!("{line}");
    }
    Ok(bad == 0)
}

/// The upstream's Valkey cache (dk-engine `workspace::valkey_cache::ValkeyCache`): the same keys,
/// commands and pipelines, on redis-rs's blocking connection (the upstream's async
/// `ConnectionManager` sends the same commands; its reconnection is not under test here).
struct UpstreamCache {
    conn: redis::Connection,
    ttl_secs: u64,
}

impl UpstreamCache {
    fn open(url: &str, ttl_secs: u64) -> Result<Self, Error> {
        let conn = redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(30))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(UpstreamCache { conn, ttl_secs })
    }

    fn meta_key(id: &Uuid) -> String {
        format!("ws:{id}:meta")
    }

    fn graph_key(id: &Uuid) -> String {
        format!("ws:{id}:graph")
    }

    fn files_set_key(id: &Uuid) -> String {
        format!("ws:{id}:files")
    }

    fn file_key(id: &Uuid, path: &str) -> String {
        format!("ws:{id}:file:{path}")
    }

    /// `SET ws:{id}:meta <to_vec_named> EX ttl`
    fn cache_workspace(&mut self, snapshot: &WorkspaceSnapshot) -> Result<(), Error> {
        let value = rmp_serde::to_vec_named(snapshot)?;
        let key = Self::meta_key(&snapshot.session_id);
        self.conn.set_ex::<_, _, ()>(key, value.as_slice(), self.ttl_secs)?;
        Ok(())
    }

    /// `GET ws:{id}:meta`: the raw value, as the upstream reads it before `from_slice`.
    fn get_raw(&mut self, id: &Uuid) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.conn.get(Self::meta_key(id))?)
    }

    /// `SMEMBERS ws:{id}:files`, then a MULTI/EXEC pipeline of `DEL` (evict) or `EXPIRE ttl`
    /// (touch) of meta, graph, files and each file key, in that order.
    fn session_pipeline(&mut self, id: &Uuid, touch: bool) -> Result<redis::Pipeline, Error> {
        let paths: Vec<String> = self.conn.smembers(Self::files_set_key(id))?;
        let mut keys = vec![Self::meta_key(id), Self::graph_key(id), Self::files_set_key(id)];
        keys.extend(paths.iter().map(|path| Self::file_key(id, path)));
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in keys {
            if touch {
                pipe.expire(key, self.ttl_secs as i64).ignore(); // (each reply ignored, as there)
            } else {
                pipe.del(key);
            }
        }
        Ok(pipe)
    }

    fn evict(&mut self, id: &Uuid) -> Result<(), Error> {
        let pipe = self.session_pipeline(id, false)?;
        pipe.query::<()>(&mut self.conn)?;
        Ok(())
    }

    fn touch(&mut self, id: &Uuid) -> Result<(), Error> {
        let pipe = self.session_pipeline(id, true)?;
        pipe.query::<()>(&mut self.conn)?;
        Ok(())
    }
}

/// What B answers for `id` once it shows `expected` (another pod's view follows the topic):
/// polls `GET` until the value decodes to `expected` or the deadline passed (one deadline for
/// all the reads, so a wrong answer costs one wait, not one per session); the last value.
fn read_until(cache: &mut UpstreamCache, id: &Uuid, expected: Option<&WorkspaceSnapshot>,
              deadline: Instant) -> Result<Option<Vec<u8>>, Error> {
    loop {
        let raw = cache.get_raw(id)?;
        let shown = raw.as_deref().map(rmp_serde::from_slice::<WorkspaceSnapshot>);
        let done = match (&shown, expected) {
            (None, None) => true,
            (Some(Ok(got)), Some(want)) => got == want,
            _ => false,
        };
        if done || Instant::now() > deadline {
            return Ok(raw);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Compares what B answered with what A was given: the bytes (`to_vec_named`'s) and, decoded
/// with `rmp_serde::from_slice` as the upstream does, the struct field for field.
fn compare(failures: &mut Vec<String>, what: &str, raw: Option<&[u8]>,
           expected: &WorkspaceSnapshot) -> Result<Json, Error> {
    let Some(raw) = raw else {
        failures.push(format!("{what}: GET answers nil"));
        return Ok(Json::Null);
    };
    let written = rmp_serde::to_vec_named(expected)?;
    if raw != written.as_slice() {
        failures.push(format!("{what}: GET's value {}", first_difference(raw, &written)));
    }
    match rmp_serde::from_slice::<WorkspaceSnapshot>(raw) {
        Ok(got) => {
            let (got, want) = (serde_json::to_value(&got)?, serde_json::to_value(expected)?);
            for field in FIELDS {
                if got[field] != want[field] {
                    failures.push(format!("{what}: field {field} reads {} != written {}",
                                          got[field], want[field]));
                }
            }
            Ok(got)
        }
        Err(err) => {
            failures.push(format!("{what}: rmp_serde::from_slice fails: {err}"));
            Ok(Json::Null)
        }
    }
}

fn redis_upstream(url_a: &str, url_b: &str, ttl: &str, out: &str) -> Result<bool, Error> {
    let ttl_secs: u64 = ttl.parse()?;
    let (mut a, mut b) = (UpstreamCache::open(url_a, ttl_secs)?, UpstreamCache::open(url_b, ttl_secs)?);
    let sessions = vec![
        session("cached by the Rust pod", "user_rust", "active", "ephemeral"),
        session("", "", "", ""),
        session("répare ☕ 修复 🚀 \u{0} שלום", "usér_ß", "активен", "persistent"),
        session(&"long ".repeat(14_000), "user_rust", "submitted", "persistent"),  // str 32
        session("to be evicted", "user_rust", "active", "ephemeral"),
    ];
    let mut failures = Vec::new();
    let mut latest = sessions.clone();
    latest[0] = WorkspaceSnapshot { state: "merged".into(), ..sessions[0].clone() };
    for snapshot in sessions.iter().chain([&latest[0]]) {
        a.cache_workspace(snapshot)?;
        // A answers OK once its own view shows the write: read your writes on the same pod
        let raw = a.get_raw(&snapshot.session_id)?;
        compare(&mut failures, &format!("A {}", snapshot.session_id), raw.as_deref(), snapshot)?;
    }
    let mut reports = Vec::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    for snapshot in &latest {
        let raw = read_until(&mut b, &snapshot.session_id, Some(snapshot), deadline)?;
        let read = compare(&mut failures, &format!("B {}", snapshot.session_id), raw.as_deref(),
                           snapshot)?;
        reports.push(json!({"written": snapshot, "read_on_b": read}));
    }
    let touched = latest[1].session_id;
    a.touch(&touched)?;
    let waited = start.elapsed();
    let raw = read_until(&mut b, &touched, Some(&latest[1]), deadline)?;
    compare(&mut failures, &format!("B after touch {touched}"), raw.as_deref(), &latest[1])?;
    let evicted = latest[4].session_id;
    a.evict(&evicted)?;
    let gone_on_a = a.get_raw(&evicted)?.is_none();
    let raw = read_until(&mut b, &evicted, None, Instant::now() + Duration::from_secs(30))?;
    let gone_on_b = raw.is_none();
    if !gone_on_a || !gone_on_b {
        failures.push(format!("evicted {evicted}: A answers nil: {gone_on_a}, B: {gone_on_b}"));
    }
    // a second eviction of what is gone succeeds too, as against Valkey
    a.evict(&evicted)?;
    for failure in &failures {
        eprintln!("MISMATCH {failure}");
    }
    let result = json!({
        "client": "redis 0.27.6 (blocking connection), rmp-serde 1.3.1",
        "sessions": reports, "touched": touched, "evicted": evicted,
        "gone_on_a": gone_on_a, "gone_on_b": gone_on_b,
        "b_caught_up_ms": waited.as_millis() as u64, "failures": failures,
    });
    std::fs::write(out, serde_json::to_vec(&result)?)?;
    Ok(result["failures"].as_array().is_some_and(Vec::is_empty))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("vectors") => vectors(&args[1..]),
        Some("publish") if args.len() == 4 => publish(&args[1], &args[2], &args[3]),
        Some("read") if args.len() == 3 => read(&args[1], &args[2]),
        Some("redis-upstream") if args.len() == 5 => {
            redis_upstream(&args[1], &args[2], &args[3], &args[4])
        }
        _ => Err("usage: vectors FILE... | publish BOOTSTRAP TOPIC OUT | read BOOTSTRAP TOPIC | \
                  redis-upstream URL_A URL_B TTL OUT".into()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}
